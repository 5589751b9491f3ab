"""Configurations drawn at random from the space the reference's DiffusionGemmaConfig accepts.

Every draw is a pure function of one integer seed (and the draw's index), so a failure names the seed that
reproduces it: `DGEMMA_PARITY_SEED=<seed> pytest tests/test_random_parity.py`.

Test-only: imports torch and transformers, which the runtime never does.
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from checkpoints import build_reference_model, save_reference_checkpoint
from reference_sampler import _NoiseTorch
from transformers.models.diffusion_gemma import generation_diffusion_gemma
from transformers.models.diffusion_gemma.generation_diffusion_gemma import EntropyBoundSamplerConfig

from mlx_dgemma.sampler import SamplerSettings, SeededNoise

SEED_VARIABLE = "DGEMMA_PARITY_SEED"
# Even (RoPE rotates pairs), mostly not multiples of 32, so no kernel's panel width is assumed.
HEAD_DIMS = (8, 12, 16, 20, 24, 32, 40, 48)
ACTIVATIONS = ("gelu_pytorch_tanh", "gelu_pytorch_tanh", "gelu", "gelu_new", "silu", "relu")
SLIDING, FULL = "sliding_attention", "full_attention"


def run_seed() -> int:
    """The seed of this run: DGEMMA_PARITY_SEED if set, else fresh from the OS."""
    value = os.environ.get(SEED_VARIABLE)
    return int(value) if value else int.from_bytes(os.urandom(4), "little")


@dataclass(frozen=True)
class DrawnConfig:
    """One drawn shape: the text_config overrides for `build_reference_model` and how to build it."""

    seed: int
    name: str
    text: dict
    canvas_length: int
    well_conditioned: bool
    spelling: str
    model_seed: int
    extra: dict = field(default_factory=dict)

    def label(self) -> str:
        """What a failure message must carry: the seed to replay and the drawn shape."""
        shape = {**self.text, "canvas_length": self.canvas_length, "well_conditioned": self.well_conditioned}
        shape.update(spelling=self.spelling, **self.extra)
        return f"{SEED_VARIABLE}={self.seed} [{self.name}] {json.dumps(shape, sort_keys=True)}"


def rng_for(seed: int, name: str) -> random.Random:
    # String seeding is deterministic across processes (unlike hash()), and each draw is independent of the others.
    return random.Random(f"{seed}/{name}")


def _vocabulary(rng: random.Random) -> int:
    vocab = rng.randint(130, 700)
    return vocab + 1 if vocab % 32 == 0 else vocab  # never a multiple of 32 (or 64)


def _heads(rng: random.Random, tiny: bool) -> tuple[int, int, int | None]:
    """Query heads, sliding KV heads (1-8, dividing the query heads), full-layer KV heads (None: the same)."""
    kv_heads = rng.randint(1, 2 if tiny else 8)
    groups = rng.choice([1, 2] if kv_heads > 4 or tiny else [1, 2, 4])
    heads = kv_heads * groups
    global_kv = rng.choice([None, *[d for d in range(1, min(heads, 8) + 1) if heads % d == 0]])
    return heads, kv_heads, global_kv


def _layer_types(rng: random.Random, layers: int) -> list[str] | None:
    """None (the reference's 5:1 default) or an explicit list; a last sliding layer is forced full by both."""
    if rng.random() < 0.4:
        return None
    return [rng.choice([SLIDING, SLIDING, FULL]) for _ in range(layers)]


def _rope_parameters(rng: random.Random) -> dict | None:
    if rng.random() < 0.4:
        return None  # the released defaults
    sliding = {"rope_type": "default", "rope_theta": rng.choice([1_000.0, 10_000.0, 50_000.0])}
    if rng.random() < 0.3:
        sliding = {"rope_type": "linear", "factor": rng.choice([2.0, 4.0]), "rope_theta": 10_000.0}
    # "default" rotates the whole head: the reference's default init ignores partial_rotary_factor's padding.
    full = {"rope_type": "default", "rope_theta": rng.choice([10_000.0, 1_000_000.0])}
    if rng.random() < 0.7:
        factor = rng.choice([0.25, 0.5, 0.75, 1.0])
        full = {"rope_type": "proportional", "partial_rotary_factor": factor, "rope_theta": rng.choice([1e4, 1e6])}
    return {SLIDING: sliding, FULL: full}


def draw_text(rng: random.Random, canvas_length: int, tiny: bool) -> dict:
    """A text_config the reference accepts; `tiny` (for big canvases) keeps every width at its smallest."""
    layers = 2 if tiny else rng.randint(2, 4)
    heads, kv_heads, global_kv = _heads(rng, tiny)
    experts = rng.randint(1, 4 if tiny else 16)
    text = dict(
        vocab_size=_vocabulary(rng),
        hidden_size=32 if tiny else rng.choice([32, 40, 48, 56, 64]),
        intermediate_size=rng.randint(16, 48 if tiny else 128),
        # The reference's grouped-mm experts need rows of a multiple of 16 bytes: widths of 4k floats.
        moe_intermediate_size=4 * rng.randint(2, 4 if tiny else 12),
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        num_global_key_value_heads=global_kv,
        head_dim=rng.choice(HEAD_DIMS[:4] if tiny else HEAD_DIMS),
        global_head_dim=rng.choice(HEAD_DIMS[:5] if tiny else HEAD_DIMS),
        # Mostly shorter than the canvas, so the decoder's sliding layers cut into it.
        sliding_window=rng.randint(2, canvas_length - 1) if rng.random() < 0.75 else rng.randint(2, 3 * canvas_length),
        num_experts=experts,
        top_k_experts=rng.randint(1, experts),
        hidden_activation=rng.choice(ACTIVATIONS),
        attention_bias=rng.random() < 0.25,
        rms_norm_eps=rng.choice([1e-6, 1e-6, 1e-5]),
        # "all" (a bidirectional encoder) fails inside the reference's own attention call: not in the space.
        use_bidirectional_attention=rng.choice([None, "vision"]),
        max_position_embeddings=4096,
    )
    layer_types = _layer_types(rng, layers)
    if layer_types is not None:
        text["layer_types"] = layer_types
    rope = _rope_parameters(rng)
    if rope is not None:
        text["rope_parameters"] = rope
    return text


def draw_config(seed: int, name: str, big_canvas: bool | None = None) -> DrawnConfig:
    """A float32 configuration: canvases 8-256, the big ones (over 64; a quarter of the draws unless
    `big_canvas` says) only on the tiniest widths."""
    rng = rng_for(seed, name)
    tiny = rng.random() < 0.25 if big_canvas is None else big_canvas
    canvas_length = rng.randint(65, 256) if tiny else rng.randint(8, 64)
    return DrawnConfig(
        seed=seed,
        name=name,
        text=draw_text(rng, canvas_length, tiny),
        canvas_length=canvas_length,
        well_conditioned=rng.random() < 0.5,
        spelling=rng.choice(["released", "per_layer"]),
        model_seed=rng.randrange(2**31),
    )


def draw_quantized_config(seed: int, name: str, bits: int) -> DrawnConfig:
    """A shape for a quantized conversion: hidden 64 and feed-forward widths that split into groups, so most
    linear layers quantize; attention widths are drawn freely (those that do not split stay float)."""
    rng = rng_for(seed, name)
    canvas_length = rng.randint(8, 48)
    text = draw_text(rng, canvas_length, tiny=False)
    group_size = rng.choice([32, 64])
    text.update(hidden_size=64, intermediate_size=rng.choice([64, 128, 192]), moe_intermediate_size=64)
    recipe = rng.choice(["mixed", "uniform"]) if bits == 4 else "uniform"
    return DrawnConfig(
        seed=seed,
        name=name,
        text=text,
        canvas_length=canvas_length,
        well_conditioned=rng.random() < 0.5,
        spelling=rng.choice(["released", "per_layer"]),
        model_seed=rng.randrange(2**31),
        extra=dict(bits=bits, group_size=group_size, recipe=recipe),
    )


def build_drawn_reference(drawn: DrawnConfig, final_norm_gain: float, dtype=torch.float32):
    """The reference model of a drawn configuration (eager attention), biases randomized where it has them."""
    reference = build_reference_model(
        seed=drawn.model_seed,
        canvas_length=drawn.canvas_length,
        final_norm_gain=final_norm_gain,
        well_conditioned=drawn.well_conditioned,
        **copy.deepcopy(drawn.text),  # the reference edits layer_types in place (the last layer forced full)
    ).eval()
    reference.config._attn_implementation = "eager"
    if drawn.text["attention_bias"]:
        _randomize_biases(reference, torch.Generator().manual_seed(drawn.model_seed + 2))
    return reference.to(dtype)


def _randomize_biases(reference, generator: torch.Generator) -> None:
    """Nonzero attention biases (the reference initializes them to zero, which would leave them untested).

    The reference ties the encoder's layer weights to the decoder's but not their biases (its tying patterns name
    weights only); a checkpoint stores the decoder's layers once, so both roles get the same biases here.
    """
    encoder_layers = reference.model.encoder.language_model.layers
    with torch.no_grad():
        for decoder_layer, encoder_layer in zip(reference.model.decoder.layers, encoder_layers):
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                projection = getattr(decoder_layer.self_attn, name)
                if projection is not None:
                    bias = 0.05 * torch.randn(projection.bias.shape, generator=generator)
                    projection.bias.copy_(bias)
                    getattr(encoder_layer.self_attn, name).bias.copy_(bias)


def save_drawn_checkpoint(reference, drawn: DrawnConfig, path) -> Path:
    """Write the reference in the draw's config spelling.

    checkpoints.save_reference_checkpoint's "released" spelling reads the full layers' shape from the
    `per_layer_config` map, which `save_pretrained` leaves empty when it equals the sliding layers': here it is
    taken from the draw instead.
    """
    path = save_reference_checkpoint(reference, path, spelling="per_layer")
    if drawn.spelling == "released":
        config = json.loads((path / "config.json").read_text())
        text = config["text_config"]
        text.pop("per_layer_config")
        text["global_head_dim"] = drawn.text["global_head_dim"]
        text["num_global_key_value_heads"] = (
            drawn.text["num_global_key_value_heads"] or drawn.text["num_key_value_heads"]
        )
        (path / "config.json").write_text(json.dumps(config, indent=2))
    return path


def expected_layer_shapes(drawn: DrawnConfig) -> list[tuple[str, int, int]]:
    """(layer type, head size, KV heads) per layer, as the draw means them (last layer forced full)."""
    text = drawn.text
    layers = text["num_hidden_layers"]
    types = list(text.get("layer_types") or [FULL if (i + 1) % 6 == 0 else SLIDING for i in range(layers)])
    types[-1] = FULL
    global_kv = text["num_global_key_value_heads"] or text["num_key_value_heads"]
    full, sliding = (text["global_head_dim"], global_kv), (text["head_dim"], text["num_key_value_heads"])
    return [(kind, *(full if kind == FULL else sliding)) for kind in types]


# --- The reference's generation, with the margins of every decision it took ---

LOGIT_MARGIN = 1e-3  # processed-logit units (up to 30 / t_min = 75): float32 rounding moves them ~1e-5
ENTROPY_MARGIN = 1e-4  # nats
STOP_RATIO = 1.05  # an arranged early stop's threshold lies 5% above the entropy that stops


@dataclass
class StepRecord:
    """One denoising step of the reference, as seen by the noise seam."""

    canvas: int
    step: int  # 1, 2, ... within the canvas
    mean_entropy: list[float]  # per row: what the confidence test compares
    argmax: torch.Tensor  # (batch, canvas): what the stability test compares and a canvas commits
    draw_margin: float  # smallest top-1 minus top-2 of processed + gumbel at an accepted position
    argmax_margin: list[float]  # per row: smallest top-1 minus top-2 of the processed logits
    boundary_margin: float  # how far the entropy-bound acceptance was from accepting one position more or fewer


def _top_two_gap(values: torch.Tensor) -> torch.Tensor:
    top = torch.topk(values, 2, dim=-1).values
    return top[..., 0] - top[..., 1]


def step_record(processed: torch.Tensor, gumbel: torch.Tensor, bound: float, canvas: int, step: int) -> StepRecord:
    """The deciding quantities of one step, recomputed as the reference's sampler computes them."""
    processed = processed.double()
    log_probs = torch.log_softmax(processed, dim=-1)
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    ordered, order = torch.sort(entropy, dim=-1)
    before = torch.cumsum(ordered, dim=-1) - ordered
    accepted_sorted = before <= bound
    accepted = torch.zeros_like(accepted_sorted).scatter(-1, order, accepted_sorted)
    # The test itself, and a swap of the last accepted with the first rejected (nearly equal entropies).
    boundary = float((before - bound).abs().min())
    count = accepted_sorted.sum(-1)
    for row, n in enumerate(count.tolist()):
        if n < ordered.shape[-1]:
            boundary = min(boundary, float(ordered[row, n] - ordered[row, n - 1]))
    return StepRecord(
        canvas=canvas,
        step=step,
        mean_entropy=entropy.mean(-1).tolist(),
        argmax=processed.argmax(-1),
        draw_margin=float(_top_two_gap(processed + gumbel.double())[accepted].min()),
        argmax_margin=_top_two_gap(processed).min(-1).values.tolist(),
        boundary_margin=boundary,
    )


class _RecordingTorch(_NoiseTorch):
    """reference_sampler's noise seam, keeping a StepRecord of every step."""

    def __init__(self, noise, vocab: int, entropy_bound: float):
        super().__init__(noise, vocab)
        self.entropy_bound, self.records = entropy_bound, []

    def multinomial(self, probs, num_samples):
        drawn = super().multinomial(probs, num_samples)
        processed = self._processed.float()
        gumbel = torch.from_numpy(np.array(self._noise.gumbel(self._canvas, self._step, tuple(processed.shape))))
        self.records.append(step_record(processed, gumbel, self.entropy_bound, self._canvas, self._step))
        return drawn


@dataclass
class ReferenceGeneration:
    tokens: np.ndarray  # (batch, new tokens)
    tokens_per_forward: np.ndarray
    records: list[StepRecord]

    def canvas_steps(self, canvas: int) -> list[StepRecord]:
        return [record for record in self.records if record.canvas == canvas]

    def margins(self, settings: SamplerSettings) -> dict[str, float]:
        """The thinnest margin of each kind of decision, each scaled so that 1 is just clear."""
        argmax = [record.argmax_margin[row] for record, row in self._committing_argmaxes(settings)]
        confidence = [
            abs(mean - settings.confidence_threshold) / settings.confidence_threshold
            for record in self.records
            for mean in record.mean_entropy
        ]
        return dict(
            draw=min(record.draw_margin for record in self.records) / LOGIT_MARGIN,
            argmax=min(argmax) / LOGIT_MARGIN,
            boundary=min(record.boundary_margin for record in self.records) / ENTROPY_MARGIN,
            confidence=min(confidence) / 0.01,  # a 1% margin of the threshold
        )

    def _committing_argmaxes(self, settings: SamplerSettings):
        """(step, row) whose argmax decided something: every step under a stability test (it compares them),
        else the step each row stopped at (its commit)."""
        for canvas in sorted({record.canvas for record in self.records}):
            steps = self.canvas_steps(canvas)
            for row in range(len(steps[0].mean_entropy)):
                if settings.stability_threshold > 0:
                    yield from ((record, row) for record in steps)
                    continue
                stops = [r for r in steps if r.mean_entropy[row] < settings.confidence_threshold]
                yield (stops[0] if stops else steps[-1]), row

    def clear(self, settings: SamplerSettings) -> bool:
        return min(self.margins(settings).values()) >= 1.0


def reference_generation(reference, ids: torch.Tensor, mask, noise, settings: SamplerSettings) -> ReferenceGeneration:
    """The reference's `generate` on our noise, recording each step."""
    kwargs = dict(
        max_new_tokens=settings.max_new_tokens,
        max_denoising_steps=settings.steps,
        t_min=settings.t_min,
        t_max=settings.t_max,
        stability_threshold=settings.stability_threshold,
        confidence_threshold=settings.confidence_threshold,
        sampler_config=EntropyBoundSamplerConfig(entropy_bound=float(settings.entropy_bound)),
        eos_token_id=list(settings.eos_token_ids),
        pad_token_id=settings.pad_token_id,
    )
    proxy = _RecordingTorch(noise, reference.config.text_config.vocab_size, settings.entropy_bound)
    original, implementation = generation_diffusion_gemma.torch, reference.config._attn_implementation
    generation_diffusion_gemma.torch = proxy
    if mask is not None:
        # The reference builds its padded decoder mask in the canvas's integer dtype, which only its SDPA path
        # (boolean masks) accepts.
        kwargs["attention_mask"] = mask
        reference.config._attn_implementation = "sdpa"
    try:
        with torch.no_grad():
            out = reference.generate(ids, **kwargs)
    finally:
        generation_diffusion_gemma.torch = original
        reference.config._attn_implementation = implementation
    tokens = out.sequences[:, ids.shape[1] :].numpy()
    return ReferenceGeneration(tokens, out.tokens_per_forward.numpy(), proxy.records)


def arranged_stop(pilot: ReferenceGeneration, rng: random.Random) -> tuple[int, float] | None:
    """(stability_threshold, confidence_threshold) that stop the pilot's first canvas early in row 0, at a step
    whose mean entropy is clearly (STOP_RATIO) below the threshold and every earlier eligible one's above it.
    Random weights never get near the default 0.005 nats (the soft-cap bounds their sharpness)."""
    steps = pilot.canvas_steps(0)
    entropies = [record.mean_entropy[0] for record in steps]
    stable = [i > 0 and torch.equal(steps[i].argmax[0], steps[i - 1].argmax[0]) for i in range(len(steps))]
    for stability in rng.sample([0, 1], 2):
        eligible = [i for i in range(len(steps) - 1) if stability == 0 or stable[i]]
        candidates = []
        for i in eligible:
            low = max(entropies[i], 1e-9)
            ceiling = min((entropies[j] for j in eligible if j < i), default=math.inf)
            if low * STOP_RATIO**2 < ceiling:
                candidates.append((i, low * STOP_RATIO))
        # Prefer a stop after a few steps to one at the first.
        later = [candidate for candidate in candidates if candidate[0] > 0]
        if later or candidates:
            return stability, rng.choice(later or candidates)[1]
    return None


# --- Generation cases whose every decision has a clear margin in the reference ---

PAD = 0
ATTEMPTS = 3  # fresh noise and prompt when a case's margins are thin


@dataclass
class GenerationCase:
    ids: torch.Tensor
    mask: torch.Tensor | None
    noise_seed: int
    settings: SamplerSettings
    expected: ReferenceGeneration
    eos_arranged: bool
    stop_arranged: bool

    def describe(self) -> str:
        margins = {key: round(value, 2) for key, value in self.expected.margins(self.settings).items()}
        shape = f"prompt {tuple(self.ids.shape)}, padded {self.mask is not None}, noise seed {self.noise_seed}"
        arranged = f"EOS arranged {self.eos_arranged}, early stop arranged {self.stop_arranged}"
        return f"{shape}; {self.settings._describe()}; {arranged}; margins (1 = just clear) {margins}"


def draw_settings(rng: random.Random, canvas_length: int, vocab: int) -> SamplerSettings:
    canvases = rng.randint(1, 2 if canvas_length > 64 else 3)
    max_new_tokens = canvases * canvas_length - rng.randint(0, canvas_length - 1)
    t_min, t_max = rng.choice([(0.4, 0.8), (0.4, 0.8), (0.25, 0.6), (0.5, 1.2)])
    return SamplerSettings(
        steps=rng.randint(4, 16),
        entropy_bound=rng.choice([0.05, 0.1, 0.1, 0.3, 1.0]),
        t_min=t_min,
        t_max=t_max,
        # The reference reads max_new_tokens == 256 as "unset" and takes max_length instead.
        max_new_tokens=255 if max_new_tokens == 256 else max_new_tokens,
        eos_token_ids=(vocab,),  # never drawn: no EOS until one is arranged
        pad_token_id=PAD,
    )


def _prompt(rng: random.Random, vocab: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    batch, length = rng.choice([1, 1, 2]), rng.randint(1, 40)
    generator = torch.Generator().manual_seed(rng.randrange(2**31))
    ids = torch.randint(3, vocab, (batch, length), generator=generator)
    if batch == 1 or length < 2 or rng.random() < 0.5:
        return ids, None
    padding = rng.randint(1, length - 1)
    mask = torch.ones_like(ids)
    mask[1, :padding] = 0  # the second row is shorter, padded on the left
    ids[1, :padding] = PAD
    return ids, mask


def _attempt(reference, rng: random.Random, settings: SamplerSettings) -> GenerationCase:
    vocab = reference.config.text_config.vocab_size
    ids, mask = _prompt(rng, vocab)
    noise_seed = rng.randrange(2**31)
    want_eos, want_stop = rng.random() < 0.6, rng.random() < 0.7

    def run(run_settings):
        return reference_generation(reference, ids, mask, SeededNoise(noise_seed), run_settings)

    # The defaults (stability 1, confidence 0.005) unless an early stop is arranged from a pilot that never stops.
    settings = settings.updated(stability_threshold=1, confidence_threshold=0.005)
    stop = arranged_stop(run(settings.updated(stability_threshold=settings.steps + 1)), rng) if want_stop else None
    if stop is not None:
        settings = settings.updated(stability_threshold=stop[0], confidence_threshold=stop[1])
    pilot = run(settings)
    # EOS only changes what a canvas commits, not how it is denoised: a token the pilot committed, declared EOS,
    # ends the same trajectory there.
    generated = [token for token in pilot.tokens[0].tolist() if token != PAD]
    if want_eos and generated:
        settings = settings.updated(eos_token_ids=(rng.choice(generated),))
        expected = run(settings)
    else:
        settings = settings.updated(eos_token_ids=(min(set(range(3, vocab)) - set(pilot.tokens.ravel().tolist())),))
        expected = pilot
    return GenerationCase(ids, mask, noise_seed, settings, expected, want_eos and bool(generated), stop is not None)


def generation_case(reference, drawn: DrawnConfig) -> GenerationCase:
    """A generation of the drawn configuration whose deciding margins in the reference are clear (else, after
    ATTEMPTS tries, the clearest one found)."""
    rng = rng_for(drawn.seed, f"{drawn.name}/generation")
    settings = draw_settings(rng, drawn.canvas_length, drawn.text["vocab_size"])
    best = None
    for _ in range(ATTEMPTS):
        case = _attempt(reference, rng, settings)
        if case.expected.clear(case.settings):
            return case
        clearest = min(case.expected.margins(case.settings).values())
        if best is None or clearest > best[0]:
            best = (clearest, case)
    return best[1]

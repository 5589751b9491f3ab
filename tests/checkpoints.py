"""Random-weight DiffusionGemma checkpoints written by the reference implementation.

Test-only: imports torch and transformers, which the runtime never does.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion
from transformers.cache_utils import DynamicCache

# A small text shape that still exercises every architectural feature: several
# sliding layers then a full one, GQA, different head sizes and KV heads on full
# layers, more experts than top-k, a window shorter than the prompts we test.
SMALL_TEXT = dict(
    vocab_size=384,
    hidden_size=64,
    intermediate_size=96,
    moe_intermediate_size=32,
    num_hidden_layers=6,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    global_head_dim=32,
    num_global_key_value_heads=1,
    sliding_window=12,
    num_experts=8,
    top_k_experts=2,
    use_bidirectional_attention="vision",
    max_position_embeddings=4096,
)

# Standardized soft tokens, 4-pixel patches pooled 3 x 3: a 12-pixel cell per soft token. One layer: the tower's
# weights are drawn before the text model's from the same seed, so each layer more would change every checkpoint's
# text weights (and the cases other tests chose for their clear margins); `vision_overrides` asks for more.
TINY_VISION = dict(
    model_type="gemma4_vision",
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=2,
    head_dim=16,
    position_embedding_size=256,
    patch_size=4,
    pooling_kernel_size=3,
    standardize=True,
)

# The image tokens of the test tokenizer (tests/tokenizer_fixture.py): <|image>, <image|>, <|image|>.
IMAGE_TOKENS = dict(boi_token_id=17, eoi_token_id=18, image_token_id=19)


def build_reference_model(
    seed: int = 0,
    canvas_length: int = 16,
    final_norm_gain: float = 4.0,
    well_conditioned: bool = False,
    feed_forward_gain: float = 1.0,
    vision_overrides: dict | None = None,
    **text_overrides,
) -> DiffusionGemmaForBlockDiffusion:
    """A float32 reference model with perturbed norms and near-1 layer scalars.

    Norm weights are spread around 1 so that a wrongly applied norm shows in the
    logits; layer scalars stay within ±5% (REFERENCE.md: wider spreads make
    free-running comparisons chaotic); the final norm is scaled up so logits
    are sharp enough for token-exact sampler comparisons.

    Random weights make a chaotic network: routers with near-tied expert
    scores and sharp unscaled attention turn a rounding difference into a
    different expert or attention pattern. `well_conditioned` gives routers
    clear margins and attention soft scores, so that reduced-precision
    checkpoints (bf16, quantized) can be held to meaningful tolerances.
    `feed_forward_gain` scales every layer's feed-forward output norm: below 1
    a position's residual stream keeps more of its own token's embedding (a
    more ordered network, `python -m bench fast`'s *ordered* checkpoint).

    The vision tower's weights are spread too (`jitter_vision`), from a
    generator of their own: the text weights are the same with or without it.
    """
    text = {**SMALL_TEXT, **text_overrides}
    vision = {**TINY_VISION, **(vision_overrides or {})}
    config = DiffusionGemmaConfig(text_config=text, vision_config=vision, canvas_length=canvas_length, **IMAGE_TOKENS)
    torch.manual_seed(seed)
    model = DiffusionGemmaForBlockDiffusion(config).eval().float()
    generator = torch.Generator().manual_seed(seed + 1)

    def jitter(shape, spread):
        return 1.0 + spread * (2 * torch.rand(shape, generator=generator) - 1)

    with torch.no_grad():
        for name, param in model.named_parameters():
            if "vision" in name:
                continue
            if name.endswith("norm.weight") or "layernorm" in name or name.endswith("router.scale"):
                param.copy_(jitter(param.shape, 0.3))
            elif name.endswith("per_expert_scale"):
                param.copy_(jitter(param.shape, 0.3))
        decoder = model.model.decoder
        decoder.norm.weight.mul_(final_norm_gain)
        for layer in decoder.layers:
            layer.post_feedforward_layernorm.weight.mul_(feed_forward_gain)
        if well_conditioned:
            for layer in decoder.layers:
                layer.router.proj.weight.mul_(50.0)
                layer.self_attn.q_norm.weight.mul_(0.25)
                layer.self_attn.k_norm.weight.mul_(0.25)
        encoder_layers = model.model.encoder.language_model.layers
        for decoder_layer, encoder_layer in zip(decoder.layers, encoder_layers):
            decoder_layer.layer_scalar.copy_(jitter((1,), 0.05))
            encoder_layer.layer_scalar.copy_(jitter((1,), 0.05))
    jitter_vision(model, seed + 2)
    return model


@torch.no_grad()
def jitter_vision(model: DiffusionGemmaForBlockDiffusion, seed: int) -> None:
    """Vision weights that make every part of the tower show: norms and the standardization spread around 1,
    position embeddings as large as the projected pixels, clipping ranges that bite."""
    generator = torch.Generator().manual_seed(seed)

    def uniform(shape, low, high):
        return low + (high - low) * torch.rand(shape, generator=generator)

    encoder = model.model.encoder
    for name, tensor in encoder.vision_tower.state_dict(keep_vars=True).items():
        if name.endswith("norm.weight") or name.endswith("std_scale"):
            tensor.copy_(uniform(tensor.shape, 0.7, 1.3))
        elif name.endswith("std_bias"):
            tensor.copy_(uniform(tensor.shape, -0.5, 0.5))
        elif name.endswith("position_embedding_table"):
            tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.5)
        elif name.endswith("input_proj.weight"):
            tensor.mul_(10.0)
        elif name.endswith(("input_min", "output_min")):
            tensor.copy_(torch.tensor(-float(uniform((), 0.5, 2.0))))
        elif name.endswith(("input_max", "output_max")):
            tensor.copy_(torch.tensor(float(uniform((), 0.5, 2.0))))


def save_reference_checkpoint(
    model: DiffusionGemmaForBlockDiffusion,
    path: Path,
    spelling: str = "released",
    max_shard_size: str | int = "5GB",
    dtype: torch.dtype | None = None,
) -> Path:
    """Write `model` as the released checkpoint is laid out.

    spelling="released" rewrites config.json with `global_head_dim` /
    `num_global_key_value_heads` as Google ships it; "per_layer" keeps the
    `per_layer_config` map that `save_pretrained` writes.
    """
    path = Path(path)
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(path, max_shard_size=max_shard_size)
    if spelling == "released":
        config_path = path / "config.json"
        config = json.loads(config_path.read_text())
        text = config["text_config"]
        per_layer = text.pop("per_layer_config")
        full = next(iter(per_layer.values()))
        text["global_head_dim"] = full["head_dim"]
        if "num_key_value_heads" in full:
            text["num_global_key_value_heads"] = full["num_key_value_heads"]
        config_path.write_text(json.dumps(config, indent=2))
    elif spelling != "per_layer":
        raise ValueError(f"unknown spelling {spelling!r}")
    return path


class ReferenceRun:
    """Drives the reference as its `generate` does: the encoder fills the cache, the decoder reads it."""

    def __init__(self, model):
        self.model = model
        self.cache = DynamicCache(config=model.config.get_text_config(decoder=True))
        self.mask = None

    @torch.no_grad()
    def encode(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        if mask is not None or self.mask is not None:
            new = mask if mask is not None else torch.ones_like(ids, dtype=torch.bool)
            self.mask = new.bool() if self.mask is None else torch.cat([self.mask, new.bool()], dim=1)
        self.model.model.encoder(input_ids=ids, attention_mask=self.mask, past_key_values=self.cache)

    @torch.no_grad()
    def denoise(self, canvas: torch.Tensor, self_conditioning_logits: torch.Tensor | None = None) -> torch.Tensor:
        decoder_mask = None
        if self.mask is not None:
            decoder_mask = torch.nn.functional.pad(self.mask, (0, canvas.shape[1]), value=True)
        return self.model(
            decoder_input_ids=canvas,
            past_key_values=self.cache,
            self_conditioning_logits=self_conditioning_logits,
            decoder_attention_mask=decoder_mask,
        ).logits

"""Random-weight DiffusionGemma checkpoints written by the reference implementation.

Test-only: imports torch and transformers, which the runtime never does.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion

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

TINY_VISION = dict(
    model_type="gemma4_vision",
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=2,
    head_dim=16,
    position_embedding_size=64,
    patch_size=4,
)


def build_reference_model(
    seed: int = 0,
    canvas_length: int = 16,
    final_norm_gain: float = 4.0,
    well_conditioned: bool = False,
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
    """
    text = {**SMALL_TEXT, **text_overrides}
    config = DiffusionGemmaConfig(text_config=text, vision_config=dict(TINY_VISION), canvas_length=canvas_length)
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
        if well_conditioned:
            for layer in decoder.layers:
                layer.router.proj.weight.mul_(50.0)
                layer.self_attn.q_norm.weight.mul_(0.25)
                layer.self_attn.k_norm.weight.mul_(0.25)
        encoder_layers = model.model.encoder.language_model.layers
        for decoder_layer, encoder_layer in zip(decoder.layers, encoder_layers):
            decoder_layer.layer_scalar.copy_(jitter((1,), 0.05))
            encoder_layer.layer_scalar.copy_(jitter((1,), 0.05))
    return model


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

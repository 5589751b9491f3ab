"""Which tensors a DiffusionGemma checkpoint must hold, and their shapes.

The expected text tensors follow from config.json alone, so a checkpoint can be
checked completely before anything is converted.
"""

from __future__ import annotations

import re
from enum import Enum

from mlx_dgemma.config import VISION_PREFIXES, LayerShape, ModelConfig, TextConfig

ENCODER_TEXT_PREFIX = "model.encoder.language_model."
_ENCODER_LAYER_SCALAR = re.compile(r"^model\.encoder\.language_model\.layers\.\d+\.layer_scalar$")

LAYER_NORMS = (
    "input_layernorm",
    "post_attention_layernorm",
    "pre_feedforward_layernorm",
    "post_feedforward_layernorm",
    "post_feedforward_layernorm_1",
    "post_feedforward_layernorm_2",
    "pre_feedforward_layernorm_2",
)


class Role(Enum):
    TEXT = "text"
    VISION = "vision"
    DROP = "drop"
    UNEXPECTED = "unexpected"


def classify(name: str, expected: dict[str, tuple[int, ...]]) -> Role:
    """What the converter does with a source tensor."""
    if name in expected:
        return Role.TEXT
    if name.startswith(VISION_PREFIXES):
        return Role.VISION
    if name == "lm_head.weight" or "rotary_emb" in name:
        # The head is tied to the embedding; rotary tables are recomputed at load time.
        return Role.DROP
    if name.startswith(ENCODER_TEXT_PREFIX) and not _ENCODER_LAYER_SCALAR.match(name):
        # Tied copies of decoder weights; only the encoder's own layer scalars are kept.
        return Role.DROP
    return Role.UNEXPECTED


def expected_text_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every text tensor the source checkpoint must hold."""
    text = config.text
    hidden = text.hidden_size
    shapes: dict[str, tuple[int, ...]] = {
        "model.decoder.embed_tokens.weight": (text.vocab_size, hidden),
        "model.decoder.norm.weight": (hidden,),
        "model.decoder.self_conditioning.pre_norm.weight": (hidden,),
        **_gated_mlp_shapes("model.decoder.self_conditioning.", hidden, text.intermediate_size),
    }
    for index, layer in enumerate(text.layers):
        shapes.update(_decoder_layer_shapes(f"model.decoder.layers.{index}.", layer, text))
        shapes[f"model.encoder.language_model.layers.{index}.layer_scalar"] = (1,)
    return shapes


def _gated_mlp_shapes(prefix: str, hidden: int, intermediate: int) -> dict[str, tuple[int, ...]]:
    return {
        f"{prefix}gate_proj.weight": (intermediate, hidden),
        f"{prefix}up_proj.weight": (intermediate, hidden),
        f"{prefix}down_proj.weight": (hidden, intermediate),
    }


def _decoder_layer_shapes(prefix: str, layer: LayerShape, text: TextConfig) -> dict[str, tuple[int, ...]]:
    hidden = text.hidden_size
    experts = text.num_experts
    moe = text.moe_intermediate_size
    shapes: dict[str, tuple[int, ...]] = {
        **_attention_shapes(f"{prefix}self_attn.", layer, text),
        **_gated_mlp_shapes(f"{prefix}mlp.", hidden, text.intermediate_size),
        f"{prefix}router.proj.weight": (experts, hidden),
        f"{prefix}router.scale": (hidden,),
        f"{prefix}router.per_expert_scale": (experts,),
        f"{prefix}experts.gate_up_proj": (experts, 2 * moe, hidden),
        f"{prefix}experts.down_proj": (experts, hidden, moe),
        f"{prefix}layer_scalar": (1,),
    }
    for norm in LAYER_NORMS:
        shapes[f"{prefix}{norm}.weight"] = (hidden,)
    return shapes


def _attention_shapes(prefix: str, layer: LayerShape, text: TextConfig) -> dict[str, tuple[int, ...]]:
    hidden = text.hidden_size
    query_width = text.num_attention_heads * layer.head_dim
    kv_width = layer.num_key_value_heads * layer.head_dim
    outputs = {"q_proj": query_width, "k_proj": kv_width, "o_proj": hidden}
    if layer.is_sliding:
        # Full-attention layers reuse the keys as values and carry no v_proj.
        outputs["v_proj"] = kv_width
    inputs = {"o_proj": query_width}
    shapes: dict[str, tuple[int, ...]] = {
        f"{prefix}q_norm.weight": (layer.head_dim,),
        f"{prefix}k_norm.weight": (layer.head_dim,),
    }
    for proj, out_width in outputs.items():
        shapes[f"{prefix}{proj}.weight"] = (out_width, inputs.get(proj, hidden))
        if text.attention_bias:
            shapes[f"{prefix}{proj}.bias"] = (out_width,)
    return shapes

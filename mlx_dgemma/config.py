"""Model configuration, read from a checkpoint's `config.json`.

Accepts both spellings of the full-attention layers' shape: the released
`global_head_dim` / `num_global_key_value_heads` keys, and the
`per_layer_config` map that `transformers` writes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SLIDING = "sliding_attention"
FULL = "full_attention"
SUPPORTED_ACTIVATIONS = ("gelu_pytorch_tanh", "gelu", "gelu_new", "silu", "relu")
SUPPORTED_ROPE_TYPES = ("default", "linear", "proportional")
# Checkpoint keys of the vision tower and the projection of its soft tokens (`model.encoder.*`).
VISION_PREFIXES = ("model.encoder.vision_tower.", "model.encoder.embed_vision.")


class ConfigError(ValueError):
    """A config.json this runtime cannot serve; the message is one line."""


@dataclass(frozen=True)
class RopeConfig:
    rope_type: str
    theta: float
    partial_rotary_factor: float = 1.0
    factor: float = 1.0


@dataclass(frozen=True)
class LayerShape:
    """What differs between layers: attention kind, head size, KV heads, RoPE."""

    layer_type: str
    head_dim: int
    num_key_value_heads: int
    rope: RopeConfig

    @property
    def is_sliding(self) -> bool:
        return self.layer_type == SLIDING


@dataclass(frozen=True)
class TextConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    moe_intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_experts: int
    top_k_experts: int
    layers: tuple[LayerShape, ...]
    sliding_window: int
    rms_norm_eps: float = 1e-6
    hidden_activation: str = "gelu_pytorch_tanh"
    attention_bias: bool = False
    final_logit_softcapping: float | None = 30.0
    max_position_embeddings: int = 131072
    pad_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 1
    bos_token_id: int | None = 2
    # "vision": the encoder lets the tokens of one image attend to each other both ways.
    use_bidirectional_attention: str | None = None


@dataclass(frozen=True)
class VisionConfig:
    """The Gemma 4 vision tower's shape, from config.json's `vision_config`."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    patch_size: int
    pooling_kernel_size: int
    position_embedding_size: int
    rope_theta: float = 100.0
    rms_norm_eps: float = 1e-6
    hidden_activation: str = "gelu_pytorch_tanh"
    use_clipped_linears: bool = False
    standardize: bool = False

    @property
    def patch_dim(self) -> int:
        """Values in one patch: 3 channels of patch_size x patch_size pixels."""
        return 3 * self.patch_size**2


@dataclass(frozen=True)
class ModelConfig:
    text: TextConfig
    canvas_length: int = 256
    model_type: str = "diffusion_gemma"
    quantization: dict[str, Any] | None = None
    vision: VisionConfig | None = None
    image_token_id: int | None = None
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def has_vision(self) -> bool:
        return self.vision is not None

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> ModelConfig:
        model_type = config.get("model_type")
        if model_type != "diffusion_gemma":
            raise ConfigError(
                f"unsupported model_type {model_type!r}: this runtime serves 'diffusion_gemma' checkpoints"
            )
        text = config.get("text_config")
        if not isinstance(text, dict):
            raise ConfigError("config.json has no 'text_config' object")
        quantization = config.get("quantization") or config.get("quantization_config")
        return cls(
            text=_text_config(text),
            canvas_length=_positive_int(config, "canvas_length", 256),
            model_type=model_type,
            quantization=quantization,
            vision=_vision_config(config.get("vision_config")),
            image_token_id=config.get("image_token_id", 258_880),
            raw=config,
        )

    @classmethod
    def from_path(cls, path: str | Path) -> ModelConfig:
        return cls.from_dict(read_config_json(path))


def read_config_json(path: str | Path) -> dict[str, Any]:
    """Parse `config.json` in a checkpoint directory, with one-line errors."""
    config_path = Path(path) / "config.json"
    if not config_path.is_file():
        raise ConfigError(f"no config.json in {path}")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ConfigError(f"{config_path} is not valid JSON ({error})") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{config_path} does not hold a JSON object")
    return config


def _positive_int(config: dict[str, Any], key: str, default: int | None = None) -> int:
    value = config.get(key, default)
    if value is None:
        raise ConfigError(f"config.json lacks '{key}'")
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"config.json '{key}' must be a positive integer, got {value!r}")
    return value


def _layer_types(text: dict[str, Any], num_layers: int) -> list[str]:
    layer_types = text.get("layer_types")
    if layer_types is None:
        # Five sliding layers then one full layer, as the reference defaults to.
        layer_types = [FULL if (i + 1) % 6 == 0 else SLIDING for i in range(num_layers)]
    layer_types = list(layer_types)
    if len(layer_types) != num_layers:
        raise ConfigError(f"'layer_types' names {len(layer_types)} layers but num_hidden_layers is {num_layers}")
    unknown = sorted(set(layer_types) - {SLIDING, FULL})
    if unknown:
        raise ConfigError(f"unsupported layer types {unknown}")
    # The reference forces the last layer to full attention.
    layer_types[-1] = FULL
    return layer_types


def _rope_configs(text: dict[str, Any]) -> dict[str, RopeConfig]:
    params = text.get("rope_parameters") or {
        SLIDING: {"rope_type": "default", "rope_theta": 10_000.0},
        FULL: {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0},
    }
    ropes = {}
    for layer_type in (SLIDING, FULL):
        entry = params.get(layer_type)
        if not isinstance(entry, dict):
            raise ConfigError(f"'rope_parameters' lacks an entry for {layer_type}")
        rope_type = entry.get("rope_type", entry.get("type", "default"))
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ConfigError(f"unsupported rope_type {rope_type!r} for {layer_type}")
        ropes[layer_type] = RopeConfig(
            rope_type=rope_type,
            theta=float(entry.get("rope_theta", 10_000.0)),
            partial_rotary_factor=float(entry.get("partial_rotary_factor", 1.0)),
            factor=float(entry.get("factor", 1.0)),
        )
    return ropes


def _per_layer_overrides(text: dict[str, Any], layer_types: list[str]) -> dict[int, dict[str, Any]]:
    """Per-layer head_dim / KV-head overrides in either spelling."""
    per_layer = text.get("per_layer_config")
    if per_layer is None:
        overrides: dict[str, Any] = {"head_dim": text.get("global_head_dim", 512)}
        global_kv = text.get("num_global_key_value_heads")
        if global_kv is not None and text.get("attention_k_eq_v", True):
            overrides["num_key_value_heads"] = global_kv
        return {i: overrides for i, kind in enumerate(layer_types) if kind == FULL}
    if not isinstance(per_layer, dict):
        raise ConfigError("'per_layer_config' must be an object")
    resolved: dict[int, dict[str, Any]] = {}
    for key, values in per_layer.items():
        if key in (SLIDING, FULL):
            targets = [i for i, kind in enumerate(layer_types) if kind == key]
        else:
            try:
                targets = [int(key)]
            except ValueError:
                raise ConfigError(f"'per_layer_config' has an unknown key {key!r}") from None
        for index in targets:
            resolved.setdefault(index, {}).update(values)
    return resolved


def _text_config(text: dict[str, Any]) -> TextConfig:
    num_layers = _positive_int(text, "num_hidden_layers")
    num_heads = _positive_int(text, "num_attention_heads")
    hidden_size = _positive_int(text, "hidden_size")
    layer_types = _layer_types(text, num_layers)
    ropes = _rope_configs(text)
    overrides = _per_layer_overrides(text, layer_types)
    base_head_dim = text.get("head_dim") or hidden_size // num_heads
    base_kv_heads = text.get("num_key_value_heads", num_heads)

    layers = []
    for index, layer_type in enumerate(layer_types):
        override = overrides.get(index, {})
        kv_heads = override.get("num_key_value_heads", base_kv_heads)
        head_dim = override.get("head_dim", base_head_dim)
        if num_heads % kv_heads:
            raise ConfigError(f"layer {index}: {num_heads} query heads do not split over {kv_heads} KV heads")
        if head_dim % 2:
            raise ConfigError(f"layer {index}: head_dim {head_dim} must be even for RoPE")
        layers.append(LayerShape(layer_type, head_dim, kv_heads, ropes[layer_type]))

    activation = text.get("hidden_activation") or text.get("hidden_act") or "gelu_pytorch_tanh"
    if activation not in SUPPORTED_ACTIVATIONS:
        raise ConfigError(f"unsupported hidden_activation {activation!r}")
    num_experts = _positive_int(text, "num_experts")
    top_k = _positive_int(text, "top_k_experts")
    if top_k > num_experts:
        raise ConfigError(f"top_k_experts {top_k} exceeds num_experts {num_experts}")

    bidirectional = text.get("use_bidirectional_attention")
    if bidirectional not in (None, "vision"):
        # "all" (a bidirectional encoder) fails inside transformers 5.23's own
        # attention call, so there is no reference to be faithful to.
        raise ConfigError(f"unsupported use_bidirectional_attention {bidirectional!r}: text encoders are causal")

    return TextConfig(
        vocab_size=_positive_int(text, "vocab_size"),
        hidden_size=hidden_size,
        intermediate_size=_positive_int(text, "intermediate_size"),
        moe_intermediate_size=_positive_int(text, "moe_intermediate_size"),
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_experts=num_experts,
        top_k_experts=top_k,
        layers=tuple(layers),
        sliding_window=_positive_int(text, "sliding_window", 512),
        rms_norm_eps=float(text.get("rms_norm_eps", 1e-6)),
        hidden_activation=activation,
        attention_bias=bool(text.get("attention_bias", False)),
        final_logit_softcapping=text.get("final_logit_softcapping", 30.0),
        max_position_embeddings=int(text.get("max_position_embeddings", 131072)),
        pad_token_id=text.get("pad_token_id", 0),
        eos_token_id=text.get("eos_token_id", 1),
        bos_token_id=text.get("bos_token_id", 2),
        use_bidirectional_attention=bidirectional,
    )


def _vision_config(vision: Any) -> VisionConfig | None:
    if vision is None:
        return None
    if not isinstance(vision, dict):
        raise ConfigError("config.json 'vision_config' must be an object")
    rope = vision.get("rope_parameters") or {}
    rope_type = rope.get("rope_type", "axial")
    if rope_type != "axial":
        raise ConfigError(f"unsupported vision rope_type {rope_type!r}: the Gemma 4 vision tower uses 'axial'")
    activation = vision.get("hidden_activation") or vision.get("hidden_act") or "gelu_pytorch_tanh"
    if activation not in SUPPORTED_ACTIVATIONS:
        raise ConfigError(f"unsupported vision hidden_activation {activation!r}")
    num_heads = _positive_int(vision, "num_attention_heads", 12)
    num_kv_heads = _positive_int(vision, "num_key_value_heads", num_heads)
    if num_heads % num_kv_heads:
        raise ConfigError(f"vision: {num_heads} query heads do not split over {num_kv_heads} KV heads")
    head_dim = _positive_int(vision, "head_dim", 64)
    if head_dim % 4:
        raise ConfigError(f"vision head_dim {head_dim} must be a multiple of 4 for its two-axis RoPE")
    return VisionConfig(
        hidden_size=_positive_int(vision, "hidden_size", 768),
        intermediate_size=_positive_int(vision, "intermediate_size", 3072),
        num_hidden_layers=_positive_int(vision, "num_hidden_layers", 16),
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=head_dim,
        patch_size=_positive_int(vision, "patch_size", 16),
        pooling_kernel_size=_positive_int(vision, "pooling_kernel_size", 3),
        position_embedding_size=_positive_int(vision, "position_embedding_size", 10 * 1024),
        rope_theta=float(rope.get("rope_theta", 100.0)),
        rms_norm_eps=float(vision.get("rms_norm_eps", 1e-6)),
        hidden_activation=activation,
        use_clipped_linears=bool(vision.get("use_clipped_linears", False)),
        standardize=bool(vision.get("standardize", False)),
    )

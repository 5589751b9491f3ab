"""Model shapes and run settings the harness knows by name.

A shape is a DiffusionGemma `text_config` (the keys transformers and both MLX
runtimes read) plus the canvas length. `bench` is small enough for a 2-core
CPU yet keeps the released model's structure (five sliding layers then a full
one, GQA, wider heads and fewer KV heads without `v_proj` on the full layer,
a dense MLP beside a top-k mixture of experts, a big vocabulary, canvas 256).
`released` is Google's 26B-A4B text shape; `quick` is a toy for smoke runs.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

# Shared by every preset: the reference defaults the runtimes must agree on.
_COMMON = dict(
    hidden_activation="gelu_pytorch_tanh",
    rms_norm_eps=1e-6,
    final_logit_softcapping=30.0,
    use_bidirectional_attention="vision",
    attention_bias=False,
)

BENCH_TEXT = dict(
    _COMMON,
    vocab_size=32768,
    hidden_size=512,
    num_hidden_layers=6,  # five sliding-window layers, then one full-attention layer
    num_attention_heads=8,
    head_dim=64,  # sliding layers: 8 query heads x 64, 4 KV heads
    num_key_value_heads=4,
    global_head_dim=128,  # full layer: 8 query heads x 128, 2 KV heads, no v_proj
    num_global_key_value_heads=2,
    intermediate_size=1024,  # dense GeGLU MLP (and the self-conditioning MLP)
    moe_intermediate_size=256,
    num_experts=32,
    top_k_experts=4,
    sliding_window=1024,
    max_position_embeddings=8192,
)

RELEASED_TEXT = dict(
    _COMMON,
    vocab_size=262144,
    hidden_size=2816,
    num_hidden_layers=30,
    num_attention_heads=16,
    head_dim=256,
    num_key_value_heads=8,
    global_head_dim=512,
    num_global_key_value_heads=2,
    intermediate_size=2112,
    moe_intermediate_size=704,
    num_experts=128,
    top_k_experts=8,
    sliding_window=1024,
    max_position_embeddings=262144,
)

QUICK_TEXT = dict(
    _COMMON,
    vocab_size=2048,
    hidden_size=64,
    num_hidden_layers=6,
    num_attention_heads=4,
    head_dim=16,
    num_key_value_heads=2,
    global_head_dim=32,
    num_global_key_value_heads=1,
    intermediate_size=128,
    moe_intermediate_size=32,
    num_experts=8,
    top_k_experts=2,
    sliding_window=48,  # shorter than the quick prompt: exercises the sliding-window cache
    max_position_embeddings=4096,
)


# Vision towers, for `python -m bench image` (bench/image.py): a Gemma 4 vision config per preset. `released` is
# DiffusionGemma 26B-A4B's (its config.json: 27 layers of hidden 1152, 16 heads x 72, MLP 4304, standardized soft
# tokens, no clipped linears, 16-pixel patches pooled 3 x 3, 280 soft tokens per image); `bench` keeps its
# structure at a width a 2-core CPU runs in seconds (4 layers of 384, 6 heads x 64, MLP 1536) and the same
# patching, so an image is as many patches and soft tokens as in the released model; `quick` is the tests' toy.
_VISION_COMMON = dict(model_type="gemma4_vision", hidden_activation="gelu_pytorch_tanh", rms_norm_eps=1e-6)

BENCH_VISION = dict(
    _VISION_COMMON,
    hidden_size=384,
    intermediate_size=1536,
    num_hidden_layers=4,
    num_attention_heads=6,
    num_key_value_heads=6,
    head_dim=64,
    patch_size=16,
    pooling_kernel_size=3,
    position_embedding_size=10240,
    standardize=True,
    use_clipped_linears=False,
)

RELEASED_VISION = dict(
    _VISION_COMMON,
    hidden_size=1152,
    intermediate_size=4304,
    num_hidden_layers=27,
    num_attention_heads=16,
    num_key_value_heads=16,
    head_dim=72,
    patch_size=16,
    pooling_kernel_size=3,
    position_embedding_size=10240,
    standardize=True,
    use_clipped_linears=False,
)

QUICK_VISION = dict(
    _VISION_COMMON,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=2,
    head_dim=16,
    patch_size=4,
    pooling_kernel_size=3,
    position_embedding_size=256,
    standardize=True,
    use_clipped_linears=False,
)

# Per preset: the vision config, the processor's soft-token budget per image, the default image (width, height).
VISION = {
    "bench": (BENCH_VISION, 280, (640, 480)),
    "released": (RELEASED_VISION, 280, (640, 480)),
    "quick": (QUICK_VISION, 70, (64, 48)),
}


@dataclass(frozen=True)
class Shape:
    name: str
    text: dict[str, Any]
    canvas_length: int = 256
    # How the MLX runtimes get weights: "checkpoint" (written by transformers,
    # loaded by each runtime) or "synthetic" (random quantized weights built in memory).
    source: str = "checkpoint"
    dtype: str = "float32"
    bits: int | None = None  # quantize the MLX runtimes' weights (mixed recipe), None keeps floats
    group_size: int = 64

    def config_dict(self) -> dict[str, Any]:
        """A config.json for the MLX runtimes' in-memory models (no vision tower)."""
        return {"model_type": "diffusion_gemma", "canvas_length": self.canvas_length, "text_config": dict(self.text)}

    def checkpoint_name(self) -> str:
        digest = hashlib.sha1(json.dumps([self.text, self.canvas_length], sort_keys=True).encode()).hexdigest()[:8]
        return f"{self.name}-{self.dtype}-{digest}"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Shape:
        return cls(**data)


PRESETS = {
    "bench": Shape("bench", BENCH_TEXT),
    "released": Shape("released", RELEASED_TEXT, source="synthetic", dtype="bfloat16", bits=4),
    "quick": Shape("quick", QUICK_TEXT, canvas_length=32),
}


def parse_shape(spec: str) -> Shape:
    """A preset name, a JSON object, or a path to a JSON file.

    JSON keys: "base" (a preset, default "bench"), "name", "canvas_length",
    "source", "dtype", "bits", "group_size", and any text_config key, e.g.
    '{"base": "released", "num_hidden_layers": 2, "vocab_size": 32768}'.
    """
    if spec in PRESETS:
        return PRESETS[spec]
    text = Path(spec).read_text() if not spec.lstrip().startswith("{") and Path(spec).is_file() else spec
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        raise ValueError(f"--shape {spec!r}: not one of {', '.join(PRESETS)}, a JSON object or a JSON file") from None
    if not isinstance(data, dict):
        raise ValueError("--shape JSON must be an object")
    base_name = data.pop("base", "bench")
    if base_name not in PRESETS:
        raise ValueError(f"--shape base {base_name!r} is not one of {', '.join(PRESETS)}")
    base = PRESETS[base_name]
    own = {
        key: data.pop(key) for key in ("name", "canvas_length", "source", "dtype", "bits", "group_size") if key in data
    }
    own.setdefault("name", f"{base_name}-custom")
    return replace(base, text={**base.text, **data}, **own)


@dataclass(frozen=True)
class Settings:
    """What every runtime is asked to do, identical across runtimes."""

    prompt_tokens: int = 512
    steps: int = 16  # fixed steps per canvas, adaptive stopping off
    adaptive_steps: int = 48  # step cap with adaptive stopping on (the reference default)
    canvases: int = 1  # canvases per generation
    repeats: int = 3  # fixed-step generations: run 0 cold, run 1 warm per-step, runs 2+ for tokens/s
    prefill_repeats: int = 3
    seed: int = 0
    cuda_plugin: bool = True  # ours: CudaOptions(enabled=...) at load; nothing changes off CUDA
    adaptive: bool = True

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Settings:
        return cls(**data)


QUICK_SETTINGS = Settings(prompt_tokens=64, steps=4, adaptive_steps=6, repeats=3, prefill_repeats=2)


@dataclass
class RunSpec:
    """Everything a worker process needs: runtime, shape, settings, where the weights are."""

    runtime: str
    shape: Shape
    settings: Settings
    checkpoint: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "runtime": self.runtime,
            "shape": self.shape.to_json(),
            "settings": self.settings.to_json(),
            "checkpoint": self.checkpoint,
            "extra": self.extra,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RunSpec:
        return cls(
            runtime=data["runtime"],
            shape=Shape.from_json(data["shape"]),
            settings=Settings.from_json(data["settings"]),
            checkpoint=data.get("checkpoint"),
            extra=data.get("extra", {}),
        )

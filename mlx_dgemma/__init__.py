"""mlx-dgemma: DiffusionGemma on MLX.

Data flow: checkpoint -> `dgemma convert` -> `load` -> `Model.encode` (prompt
into the cache) -> `Model.denoise` (canvas logits) -> sampler -> text.
"""

from .cache import EncoderCache
from .config import ConfigError, ModelConfig
from .constrained import FillResult, edit, fill_template, infill
from .generate import (
    Chat,
    Commit,
    Done,
    Draft,
    GenerationResult,
    GenerationStats,
    generate,
    stream_generate,
)
from .kernels import prefer_larger_cuda_graphs
from .loader import LoadError, load, load_model
from .model import Model
from .moe import moe_dispatch, set_moe_dispatch
from .sampler import Noise, SamplerSettings, SeededNoise

# Before MLX's first launch, which reads the setting (no imported module launches anything).
prefer_larger_cuda_graphs()

__all__ = [
    "Chat",
    "Commit",
    "ConfigError",
    "Done",
    "Draft",
    "EncoderCache",
    "FillResult",
    "GenerationResult",
    "GenerationStats",
    "LoadError",
    "Model",
    "ModelConfig",
    "Noise",
    "SamplerSettings",
    "SeededNoise",
    "edit",
    "fill_template",
    "generate",
    "infill",
    "load",
    "load_model",
    "moe_dispatch",
    "set_moe_dispatch",
    "stream_generate",
]

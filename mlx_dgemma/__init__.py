"""mlx-dgemma: DiffusionGemma on MLX.

Data flow: checkpoint -> `dgemma convert` -> `load` -> `Model.encode` (prompt
into the cache) -> `Model.denoise` (canvas logits) -> sampler -> text.
"""

from .backends.cuda import CudaOptions
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
from .images import PreparedImage, VisionSettings, load_image, prepare_image
from .loader import LoadError, load, load_model
from .model import Model
from .sampler import FastSettings, Noise, SamplerSettings, SeededNoise

__all__ = [
    "Chat",
    "Commit",
    "ConfigError",
    "CudaOptions",
    "Done",
    "Draft",
    "EncoderCache",
    "FastSettings",
    "FillResult",
    "GenerationResult",
    "GenerationStats",
    "LoadError",
    "Model",
    "ModelConfig",
    "Noise",
    "PreparedImage",
    "SamplerSettings",
    "SeededNoise",
    "VisionSettings",
    "edit",
    "fill_template",
    "generate",
    "infill",
    "load",
    "load_image",
    "load_model",
    "prepare_image",
    "stream_generate",
]

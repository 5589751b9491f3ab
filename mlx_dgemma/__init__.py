"""mlx-dgemma: DiffusionGemma on MLX."""

from .cache import EncoderCache
from .config import ConfigError, ModelConfig
from .loader import LoadError, load, load_model
from .model import Model
from .moe import moe_dispatch, set_moe_dispatch

__all__ = [
    "ConfigError",
    "EncoderCache",
    "LoadError",
    "Model",
    "ModelConfig",
    "load",
    "load_model",
    "moe_dispatch",
    "set_moe_dispatch",
]

"""Convert DiffusionGemma checkpoints (Hugging Face layout) into MLX checkpoints.

The output uses the key names and `quantization` block of the community MLX
conversions, so mlx-vlm and mlx-dgemma load each other's files.
"""

from .errors import ConversionError
from .pipeline import convert_checkpoint

__all__ = ["ConversionError", "convert_checkpoint"]

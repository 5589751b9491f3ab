"""Fine-tuning DiffusionGemma with LoRA: the block-diffusion objective, adapters, data and the trainer.

`dgemma lora` (cli/lora.py) drives it; `apply_adapter` (or `load(..., adapter_path=...)`) puts a trained
adapter on a loaded model.
"""

from .adapters import AdapterError, LoraSettings, add_lora, apply_adapter, fuse_adapter, save_adapter
from .objective import BlockNoise, DiffusionBatch, Example, block_diffusion_loss, make_batch

__all__ = [
    "AdapterError",
    "BlockNoise",
    "DiffusionBatch",
    "Example",
    "LoraSettings",
    "add_lora",
    "apply_adapter",
    "block_diffusion_loss",
    "fuse_adapter",
    "make_batch",
    "save_adapter",
]

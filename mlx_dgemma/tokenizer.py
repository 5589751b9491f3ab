"""The checkpoint's own tokenizer, through mlx-lm's wrapper."""

from __future__ import annotations

from pathlib import Path

from mlx_lm.tokenizer_utils import TokenizerWrapper
from mlx_lm.tokenizer_utils import load as load_mlx_lm_tokenizer


def load_tokenizer(path: str | Path) -> TokenizerWrapper:
    """mlx-lm's TokenizerWrapper (with its streaming detokenizer) for a checkpoint directory."""
    return load_mlx_lm_tokenizer(Path(path))

"""`dgemma convert`: the converter's own command (mlx_dgemma.convert.cli), registered here."""

from __future__ import annotations

from ..convert.cli import convert_command

__all__ = ["convert_command"]

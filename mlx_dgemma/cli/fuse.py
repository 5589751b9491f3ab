"""`dgemma fuse`: merge a LoRA adapter into its base model and write a checkpoint (mlx_dgemma.lora.fuse)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from ..convert.cli import one_of, progress_reporter
from ..convert.quantize import DTYPES, SUPPORTED_BITS, SUPPORTED_GROUP_SIZES
from .common import DEFAULT_MODEL, ModelOption, stderr_console


def fuse(
    out: Annotated[Path, typer.Argument(help="Output directory for the merged model (must not exist or be empty).")],
    adapter_path: Annotated[
        Path,
        typer.Option(
            "--adapter-path",
            "--adapter",
            metavar="DIR",
            show_default=False,
            help="The adapter directory (adapters.safetensors, adapter_config.json) that dgemma lora wrote.",
        ),
    ],
    model: ModelOption = DEFAULT_MODEL,
    bits: Annotated[
        int | None,
        typer.Option(
            callback=one_of(*SUPPORTED_BITS),
            metavar="[4|8]",
            show_default=False,
            help="Quantize the output with the conversion's recipe at these bits (see --recipe). Default: keep "
            "the base model's quantization (a float base stays float).",
        ),
    ] = None,
    group_size: Annotated[
        int | None,
        typer.Option(
            callback=one_of(*SUPPORTED_GROUP_SIZES),
            metavar="[32|64|128]",
            show_default=False,
            help="Weights sharing one scale and bias, with --bits (default 64).",
        ),
    ] = None,
    recipe: Annotated[
        str,
        typer.Option(
            callback=one_of("mixed", "uniform"),
            metavar="[mixed|uniform]",
            help="With --bits: mixed puts the experts at --bits and attention, dense MLPs, self-conditioning and "
            "the embedding at 8 bits; uniform puts all of them at --bits (as dgemma convert).",
        ),
    ] = "mixed",
    dequantize: Annotated[
        bool, typer.Option("--dequantize", help="Write a float model, whatever the base's quantization.")
    ] = False,
    dtype: Annotated[
        str | None,
        typer.Option(
            callback=one_of(*DTYPES),
            metavar="[bfloat16|float16|float32]",
            show_default=False,
            help="Float dtype of every unquantized tensor and of the quantization scales (default: the base's).",
        ),
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", help="Replace OUT if it exists (only once the merged model is complete).")
    ] = False,
) -> None:
    """Merge a LoRA adapter into its base model and write the result as a checkpoint.

    Each adapted layer becomes W + scale·B·A (dequantized first on a quantized
    base, requantized after). By default the output keeps the base's
    quantization; --bits requantizes with the conversion's recipe, --dequantize
    writes a float model. OUT loads like any conversion (dgemma generate -m
    OUT); it appears only once complete, and an interrupted run leaves nothing.
    Example: dgemma fuse -m mlx-community/diffusiongemma-26B-A4B-it-4bit
    --adapter-path adapters fused-4bit
    """
    from ..lora.fuse import fuse_checkpoint

    err = stderr_console()
    try:
        with progress_reporter(err, "fusing", "wrote {done}/{total} modules") as report:
            result = fuse_checkpoint(
                model,
                adapter_path,
                out,
                bits=bits,
                group_size=group_size,
                recipe=recipe,
                dequantize=dequantize,
                dtype=dtype,
                force=force,
                progress=report,
            )
    except KeyboardInterrupt:
        print(f"interrupted; nothing written to {out}", file=sys.stderr)
        raise typer.Exit(130) from None
    layers = "layer" if result.fused == 1 else "layers"
    print(f"fused {adapter_path} into {model} ({result.fused} {layers}) -> {result.path}", file=sys.stderr)

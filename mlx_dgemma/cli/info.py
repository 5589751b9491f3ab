"""`dgemma info`: what a checkpoint is and what it needs here, from config.json and the safetensors headers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from ..backends import cuda
from ..config import ModelConfig, TextConfig
from ..loader import resolve_model_path
from ..memory import (
    DEFAULT_CONTEXT,
    IMAGE_PROMPT_TOKENS,
    available_memory,
    check_weights,
    checkpoint_dtype,
    count_parameters,
    cuda_options_that_fit,
    default_context,
    estimate_memory,
    format_bytes,
    format_count,
    model_bytes,
    quantization_summary,
    vision_bytes,
)
from .common import DEFAULT_MODEL


def _architecture(config: ModelConfig) -> dict[str, Any]:
    text: TextConfig = config.text
    sliding = [shape for shape in text.layers if shape.is_sliding]
    full = [shape for shape in text.layers if not shape.is_sliding]
    return {
        "model_type": config.model_type,
        "layers": len(text.layers),
        "sliding_layers": len(sliding),
        "full_layers": len(full),
        "sliding_window": text.sliding_window,
        "hidden_size": text.hidden_size,
        "intermediate_size": text.intermediate_size,
        "attention_heads": text.num_attention_heads,
        "sliding_kv_heads": sliding[0].num_key_value_heads if sliding else None,
        "sliding_head_dim": sliding[0].head_dim if sliding else None,
        "full_kv_heads": full[0].num_key_value_heads if full else None,
        "full_head_dim": full[0].head_dim if full else None,
        "experts": text.num_experts,
        "top_k_experts": text.top_k_experts,
        "moe_intermediate_size": text.moe_intermediate_size,
        "vocab_size": text.vocab_size,
        "canvas_length": config.canvas_length,
        "max_position_embeddings": text.max_position_embeddings,
    }


def _memory(path: Path, context: int, adapter_bytes: int = 0) -> dict[str, Any]:
    estimate = estimate_memory(path, context)
    available, source = available_memory()
    fits_stored = estimate.total + adapter_bytes <= available
    # As loading will do: under CUDA the dense layers dequantized, when that fits.
    options, extra = cuda_options_that_fit(path, estimate) if fits_stored else (None, 0)
    dequantized = fits_stored and options is None and cuda.available()
    return {
        "context": context,
        "weights": estimate.weights,
        "kv_cache": estimate.kv_cache,
        "activations": estimate.activations,
        "dense_layers": "dequantized" if dequantized else "quantized",
        "dequantized_dense": extra,
        "adapter": adapter_bytes,
        "total": estimate.total + extra + adapter_bytes,
        "available": available,
        "available_source": source,
        "fits": fits_stored,
    }


def describe(path: Path, context: int | None, adapter: Path | None = None) -> dict[str, Any]:
    """The facts `dgemma info` shows, with the LoRA adapter at `adapter` if given; raises (one line) on a context
    beyond the model's, broken weight files or an unreadable adapter."""
    config = ModelConfig.from_path(path)
    limit = config.text.max_position_embeddings
    if context is None:
        context = default_context(config)
    elif context > limit:
        raise ValueError(f"--context {context} is beyond the model's context of {limit} positions")
    # A random or truncated file would otherwise be skipped by the estimates and reported as fitting.
    files = check_weights(path)
    counts = count_parameters(config)
    adapter_facts = None
    if adapter is not None:
        from ..lora.adapters import describe_adapter  # mlx_lm's tuner loads only for an adapter

        adapter_facts = describe_adapter(adapter, config)
    facts = {
        "path": str(path),
        "architecture": _architecture(config),
        "parameters": {"total": counts.total, "active": counts.active, "groups": counts.groups},
        "quantization": quantization_summary(config, checkpoint_dtype(path)),
        "disk_bytes": model_bytes(path),
        "safetensors_files": len(files),
        "vision_bytes": vision_bytes(path) if config.has_vision else 0,
        "memory": _memory(path, context, adapter_facts["bytes"] if adapter_facts else 0),
    }
    if adapter_facts is not None:
        facts["adapter"] = adapter_facts
    return facts


def _heads(count: int | None, dim: int | None) -> str:
    return f"{count} KV head{'s' if count != 1 else ''} × {dim}"


def _architecture_rows(arch: dict[str, Any]) -> list[tuple[str, str]]:
    attention = f"{arch['attention_heads']} query heads"
    if arch["sliding_layers"]:
        attention += f"; sliding layers {_heads(arch['sliding_kv_heads'], arch['sliding_head_dim'])}"
    if arch["full_layers"]:
        attention += f"; full layers {_heads(arch['full_kv_heads'], arch['full_head_dim'])} (keys serve as values)"
    return [
        (
            "architecture",
            f"{arch['model_type']}, {arch['layers']} layers: {arch['sliding_layers']} sliding "
            f"(window {arch['sliding_window']}) + {arch['full_layers']} full attention",
        ),
        ("hidden size", f"{arch['hidden_size']}; dense MLP {arch['intermediate_size']}"),
        ("attention", attention),
        (
            "experts",
            f"{arch['experts']} per layer, top {arch['top_k_experts']} per token, {arch['moe_intermediate_size']} wide",
        ),
        ("vocabulary", f"{arch['vocab_size']:,} tokens (embedding tied to the output head)"),
        ("canvas", f"{arch['canvas_length']} tokens denoised together"),
        ("context", f"{arch['max_position_embeddings']:,} positions"),
    ]


def _storage_rows(info: dict[str, Any]) -> list[tuple[str, str]]:
    params, files = info["parameters"], info["safetensors_files"]
    groups = " · ".join(f"{name.replace('_', ' ')} {count:,}" for name, count in params["groups"].items())
    vision = (
        f"{format_bytes(info['vision_bytes'])}, loaded: images in (one at the default budget takes "
        f"{IMAGE_PROMPT_TOKENS} tokens of context)"
        if info["vision_bytes"]
        else "none (text only)"
    )
    return [
        (
            "parameters",
            f"{params['total']:,} total ({format_count(params['total'])}), "
            f"{params['active']:,} active per token ({format_count(params['active'])})",
        ),
        ("", groups),
        ("quantization", info["quantization"]),
        ("vision tower", vision),
        ("size on disk", f"{format_bytes(info['disk_bytes'])} in {files} safetensors file{'s' if files != 1 else ''}"),
    ]


def _adapter_rows(adapter: dict[str, Any]) -> list[tuple[str, str]]:
    trained_on = f"trained on {adapter['trained_on']}" if adapter["trained_on"] else "its base model unrecorded"
    if adapter["fused_into_this_model"]:
        verdict = "already fused into this model (dgemma fuse): load the model alone"
    elif adapter["shape_difference"]:
        verdict = f"another model's ({adapter['shape_difference']}): this model refuses it"
    else:
        verdict = "a model of this shape"
    return [
        (
            "adapter",
            f"{adapter['path']}: LoRA rank {adapter['rank']}, scale {adapter['scale']:g}, on "
            f"{adapter['layers']} of {adapter['of_layers']} layers: {', '.join(adapter['keys'])}",
        ),
        ("", f"{adapter['parameters']:,} parameters, {format_bytes(adapter['bytes'])}; {trained_on}, {verdict}"),
    ]


def _memory_rows(memory: dict[str, Any]) -> list[tuple[str, str]]:
    verdict = "fits" if memory["fits"] else "does NOT fit"
    dense = memory["dequantized_dense"]
    peak = (
        f"about {format_bytes(memory['total'])} at {memory['context']:,} tokens: weights "
        f"{format_bytes(memory['weights'])}"
        + (f" + dense layers dequantized on this GPU {format_bytes(dense)}" if dense else "")
        + (f" + adapter {format_bytes(memory['adapter'])}" if memory["adapter"] else "")
        + f" + KV cache {format_bytes(memory['kv_cache'])} + activations {format_bytes(memory['activations'])}"
    )
    return [
        ("peak memory", peak),
        ("this machine", f"{format_bytes(memory['available'])} ({memory['available_source']}): {verdict}"),
    ]


def format_info(info: dict[str, Any]) -> str:
    rows = [
        ("model", info["path"]),
        *_architecture_rows(info["architecture"]),
        *_storage_rows(info),
        *(_adapter_rows(info["adapter"]) if "adapter" in info else []),
        *_memory_rows(info["memory"]),
    ]
    return "\n".join(f"{label:<14} {value}".rstrip() for label, value in rows)


def info(
    model: Annotated[
        str,
        typer.Argument(
            metavar="MODEL",
            show_default=False,
            help="Checkpoint directory or Hugging Face repo id (downloaded if not cached). Default: see below.",
        ),
    ] = DEFAULT_MODEL,
    context: Annotated[
        int | None,
        typer.Option(
            "--context",
            "-c",
            min=1,
            help=f"Tokens of context for the memory estimate (default: {DEFAULT_CONTEXT}, plus "
            f"{IMAGE_PROMPT_TOKENS} for one image where the model reads images, or the model's maximum).",
        ),
    ] = None,
    adapter: Annotated[
        Path | None,
        typer.Option(
            "--adapter",
            metavar="DIR",
            help="Also describe this LoRA adapter directory (from dgemma lora) and whether it fits the model.",
        ),
    ] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print the same facts as one JSON object.")] = False,
) -> None:
    """Describe a checkpoint: shape, parameters, quantization, size, and memory needed here.

    Shows the architecture, parameters in total and active per token, the
    quantization, the size on disk, and the estimated peak memory for a context
    of --context tokens compared with this machine's memory; with --adapter,
    the adapter's LoRA settings and size and whether it was trained on a model
    of this shape. Reads config.json and the safetensors headers only (checking
    them); nothing is loaded.
    """
    facts = describe(resolve_model_path(model), context, adapter)
    print(json.dumps(facts, indent=2) if json_output else format_info(facts))

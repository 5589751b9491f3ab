"""`dgemma lora`: fine-tune a LoRA adapter with the block-diffusion objective (mlx_dgemma.lora)."""

from __future__ import annotations

import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any

import typer

from ..lora.adapters import (
    DEFAULT_KEYS,
    AdapterError,
    LoraSettings,
    adapter_config,
    add_lora,
    parse_keys,
    read_adapter_config,
    settings_from_config,
)
from ..lora.data import LONG_SEQUENCES, load_datasets
from ..lora.memory import TrainingShape, plan_for_machine, training_plan
from ..lora.trainer import OPTIMIZERS, Trainer, TrainingConfig, TrainingError, stop_on_interrupt
from ..memory import available_memory, check_weights, format_bytes
from .common import DEFAULT_MODEL, ModelOption

# mlx-lm's YAML keys that we read, and those we accept and ignore (with what they must be, when anything).
_CONFIG_KEYS = {
    "model",
    "data",
    "iters",
    "batch_size",
    "learning_rate",
    "num_layers",
    "lora_layers",
    "lora_parameters",
    "adapter_path",
    "resume",
    "val_batches",
    "steps_per_report",
    "steps_per_eval",
    "save_every",
    "grad_checkpoint",
    "seed",
    "max_seq_length",
    "long_sequences",
    "ar_weight",
    "optimizer",
    "optimizer_config",
    "lr_schedule",
    "test",
    "test_batches",
    "fine_tune_type",
    "train",
    "mask_prompt",
    "eps",
    "self_conditioning",
}
_IGNORED = {"train", "mask_prompt", "report_to", "project_name", "wandb", "config"}


def read_config(path: Path) -> dict[str, Any]:
    import yaml

    try:
        data = yaml.safe_load(path.read_text()) or {}
    except OSError as error:
        raise ValueError(f"cannot read {path}: {error.strerror or error}") from None
    except yaml.YAMLError as error:
        raise ValueError(f"{path} is not valid YAML: {' '.join(str(error).split())}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a mapping of settings")
    unknown = sorted(set(data) - _CONFIG_KEYS - _IGNORED)
    if unknown:
        raise ValueError(f"{path}: unknown setting {unknown[0]!r}")
    if data.get("fine_tune_type", "lora") != "lora":
        raise ValueError(f"{path}: fine_tune_type {data['fine_tune_type']!r}: only lora is supported")
    if data.get("grad_accumulation_steps", 1) != 1:
        raise ValueError(f"{path}: grad_accumulation_steps is not supported")
    return data


def _layers(value: Any, total: int) -> int:
    if value is None or str(value).strip().lower() in ("all", "-1"):
        return -1
    try:
        count = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"--lora-layers must be a number of layers or 'all', got {value!r}") from None
    return count


def lora(
    model: ModelOption = DEFAULT_MODEL,
    data: Annotated[
        str | None,
        typer.Option("--data", help="Directory with train.jsonl and valid.jsonl (test.jsonl for --test)."),
    ] = None,
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="YAML file of settings (mlx-lm's keys); flags override.")
    ] = None,
    iters: Annotated[int | None, typer.Option("--iters", help="Iterations to train (default 1000).")] = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size", help="Sequences per iteration (default 4).")] = None,
    learning_rate: Annotated[
        float | None, typer.Option("--learning-rate", help="Adam learning rate (default 1e-5).")
    ] = None,
    lora_rank: Annotated[int | None, typer.Option("--lora-rank", help="Rank of each update (default 8).")] = None,
    lora_scale: Annotated[
        float | None, typer.Option("--lora-scale", help="Scale of each update (default 20, as mlx-lm).")
    ] = None,
    lora_dropout: Annotated[float | None, typer.Option("--lora-dropout", help="Dropout (default 0).")] = None,
    lora_layers: Annotated[
        str | None,
        typer.Option(
            "--lora-layers", "--num-layers", help="How many layers, from the top, get adapters (default all)."
        ),
    ] = None,
    lora_keys: Annotated[
        str | None,
        typer.Option(
            "--lora-keys",
            help="What in each layer gets an adapter: a comma list of q_proj, k_proj, v_proj, o_proj, gate_proj, "
            "up_proj, down_proj, or groups attention, mlp, experts, default (attention + mlp).",
        ),
    ] = None,
    adapter_path: Annotated[
        str | None, typer.Option("--adapter-path", help="Where the adapter is saved (default ./adapters).")
    ] = None,
    resume: Annotated[
        bool | None, typer.Option("--resume", help="Continue from the last save in --adapter-path.")
    ] = None,
    val_batches: Annotated[
        int | None, typer.Option("--val-batches", help="Validation batches per evaluation, -1 for all (default 25).")
    ] = None,
    steps_per_report: Annotated[
        int | None, typer.Option("--steps-per-report", help="Iterations between progress lines (default 10).")
    ] = None,
    steps_per_eval: Annotated[
        int | None, typer.Option("--steps-per-eval", help="Iterations between validations, 0 for none (default 200).")
    ] = None,
    save_every: Annotated[
        int | None, typer.Option("--save-every", help="Iterations between saves (default 100).")
    ] = None,
    grad_checkpoint: Annotated[
        bool | None, typer.Option("--grad-checkpoint", help="Recompute each layer in the backward pass: less memory.")
    ] = None,
    seed: Annotated[int | None, typer.Option("--seed", min=0, help="Random seed (default 0).")] = None,
    max_seq_length: Annotated[
        int | None, typer.Option("--max-seq-length", help="Longest sequence in tokens (default 2048).")
    ] = None,
    long_sequences: Annotated[
        str | None,
        typer.Option("--long-sequences", help="What to do with longer ones: truncate (default) or drop."),
    ] = None,
    ar_weight: Annotated[
        float | None,
        typer.Option("--ar-weight", help="Weight of the encoder's autoregressive loss (default 1, as the recipe)."),
    ] = None,
    optimizer: Annotated[
        str | None, typer.Option("--optimizer", help=f"One of {', '.join(OPTIMIZERS)} (default adam).")
    ] = None,
    test: Annotated[bool | None, typer.Option("--test", help="Evaluate on test.jsonl after training.")] = None,
    test_batches: Annotated[
        int | None, typer.Option("--test-batches", help="Test batches, -1 for all (default 500).")
    ] = None,
    plan_only: Annotated[
        bool,
        typer.Option(
            "--plan-only",
            "--dry-run",
            help="Print the memory plan (with and without --grad-checkpoint) and exit without loading the model; "
            "--data is optional (without it, sequences of --max-seq-length).",
        ),
    ] = False,
) -> int:
    """Fine-tune a LoRA adapter on your data with the block-diffusion objective.

    Trains low-rank updates of the attention and dense MLP projections (the
    experts too with --lora-keys default,experts) of a float or quantized
    (QLoRA) model; the router stays frozen. Ctrl-C saves the adapter; --resume
    continues exactly where the last save left off. Use the adapter with
    --adapter, or merge it with dgemma fuse. Example:
    dgemma lora --model mlx-community/diffusiongemma-26B-A4B-it-4bit --data ./data --iters 600
    """
    settings: dict[str, Any] = read_config(config) if config is not None else {}
    flags = {
        "model": model if model != DEFAULT_MODEL or "model" not in settings else None,
        "data": data,
        "iters": iters,
        "batch_size": batch_size,
        "learning_rate": learning_rate,
        "adapter_path": adapter_path,
        "resume": resume,
        "val_batches": val_batches,
        "steps_per_report": steps_per_report,
        "steps_per_eval": steps_per_eval,
        "save_every": save_every,
        "grad_checkpoint": grad_checkpoint,
        "seed": seed,
        "max_seq_length": max_seq_length,
        "long_sequences": long_sequences,
        "ar_weight": ar_weight,
        "optimizer": optimizer,
        "test": test,
        "test_batches": test_batches,
    }
    settings.update({key: value for key, value in flags.items() if value is not None})
    lora_params = dict(settings.get("lora_parameters") or {})
    for key, value in (("rank", lora_rank), ("scale", lora_scale), ("dropout", lora_dropout)):
        if value is not None:
            lora_params[key] = value
    if lora_keys is not None:
        lora_params["keys"] = lora_keys
    layers_value = lora_layers if lora_layers is not None else settings.get("lora_layers", settings.get("num_layers"))
    if not settings.get("data") and not plan_only:
        raise ValueError("no training data: pass --data DIR (a directory with train.jsonl and valid.jsonl)")
    return run(settings, lora_params, layers_value, plan_only)


def _training_shape(datasets: dict[str, Any] | None, batch: int, max_seq_length: int, checkpoint: bool):
    """The longest sequence and response a step may see: the data's, or --max-seq-length's without data."""
    if not datasets:
        return TrainingShape(batch, max_seq_length, max_seq_length - 1, checkpoint)
    examples = [example for dataset in datasets.values() for example in dataset.examples]
    length = max(len(example.tokens) for example in examples)
    responses = max(example.response_length for example in examples)
    return TrainingShape(batch, length, responses, checkpoint)


def run(settings: dict[str, Any], lora_params: dict[str, Any], layers_value: Any, plan_only: bool = False) -> int:
    from ..backends.cuda import CudaOptions
    from ..config import ModelConfig
    from ..loader import TOKENIZER_FILES, LoadError, load_model, resolve_model_path
    from ..tokenizer import load_tokenizer

    out = Path(settings.get("adapter_path") or "adapters").expanduser()
    resume = bool(settings.get("resume"))
    if settings.get("long_sequences", "truncate") not in LONG_SEQUENCES:
        raise ValueError(f"--long-sequences must be one of {', '.join(LONG_SEQUENCES)}")
    training = TrainingConfig(
        iters=int(settings.get("iters", 1000)),
        batch_size=int(settings.get("batch_size", 4)),
        learning_rate=float(settings.get("learning_rate", 1e-5)),
        optimizer=str(settings.get("optimizer", "adam")).lower(),
        optimizer_config=dict((settings.get("optimizer_config") or {}).get(settings.get("optimizer", "adam"), {})),
        lr_schedule=settings.get("lr_schedule"),
        steps_per_report=int(settings.get("steps_per_report", 10)),
        steps_per_eval=int(settings.get("steps_per_eval", 200)),
        val_batches=int(settings.get("val_batches", 25)),
        save_every=int(settings.get("save_every", 100)),
        grad_checkpoint=bool(settings.get("grad_checkpoint", False)),
        seed=int(settings.get("seed", 0)),
        ar_weight=float(settings.get("ar_weight", 1.0)),
        eps=float(settings.get("eps", 1e-3)),
        self_conditioning=float(settings.get("self_conditioning", 0.5)),
    )
    training.check()
    max_seq_length = int(settings.get("max_seq_length", 2048))
    if max_seq_length < 2:
        raise ValueError(f"--max-seq-length must be at least 2, got {max_seq_length}")
    # On --resume the adapter's own settings rule; flags that contradict them are refused.
    saved = None
    if resume:
        saved_config = read_adapter_config(out)
        saved, saved_layers = settings_from_config(saved_config, out)
        given_rank = lora_params.get("rank")
        if given_rank is not None and int(given_rank) != saved.rank:
            raise AdapterError(f"--resume: the adapter in {out} has rank {saved.rank}, not {given_rank}")
    path = resolve_model_path(settings.get("model") or DEFAULT_MODEL)
    if not plan_only:  # a plan needs only config.json (the weights' headers when there are any)
        check_weights(path)
    model_config = ModelConfig.from_path(path)
    if saved is not None:
        lora_settings = saved
    else:
        lora_settings = LoraSettings(
            rank=int(lora_params.get("rank", 8)),
            scale=float(lora_params.get("scale", 20.0)),
            dropout=float(lora_params.get("dropout", 0.0)),
            num_layers=_layers(layers_value, model_config.text.num_hidden_layers),
            keys=parse_keys(lora_params.get("keys") or DEFAULT_KEYS),
        )
    # The data first: its errors come before the model loads, and its longest sequence sizes the memory plan.
    datasets = tokenizer = None
    if settings.get("data") or not plan_only:
        if not any((path / name).is_file() for name in TOKENIZER_FILES):
            raise LoadError(f"no tokenizer in {path}: expected one of {', '.join(TOKENIZER_FILES)}")
        tokenizer = load_tokenizer(path)
        datasets = load_datasets(
            settings["data"],
            tokenizer,
            max_seq_length,
            settings.get("long_sequences", "truncate"),
            test=bool(settings.get("test")),
        )
        for dataset in datasets.values():
            for note in dataset.notes:
                print(f"note: {note}", file=sys.stderr)
    shape = _training_shape(datasets, training.batch_size, max_seq_length, training.grad_checkpoint)
    if plan_only:
        available, source = available_memory()
        for checkpoint in (training.grad_checkpoint, not training.grad_checkpoint):
            plan = training_plan(path, lora_settings, replace(shape, grad_checkpoint=checkpoint), training.optimizer)
            plan = replace(plan, available=available, source=source)
            verdict = "fits" if plan.fits else "does not fit"
            print(f"{plan.describe()}: {verdict}", flush=True)
        return 0
    assert datasets is not None  # --data is required unless --plan-only
    plan = plan_for_machine(path, lora_settings, shape, training.optimizer, max_seq_length)
    print(plan.describe(), file=sys.stderr)
    print(f"loading {path}", file=sys.stderr)
    began = time.perf_counter()
    # No backend plug-in: its custom kernels have no gradients.
    model = load_model(path, cuda_options=CudaOptions(enabled=False))
    print(f"loaded in {time.perf_counter() - began:.1f} s", file=sys.stderr)
    count = add_lora(model, lora_settings, seed=training.seed)
    fill = tokenizer.eos_token_id
    if fill is None:
        raise ValueError("the tokenizer has no EOS token to close a canvas with")
    trainable = sum(v.size for _, v in __import__("mlx.utils").utils.tree_flatten(model.trainable_parameters()))
    print(
        f"LoRA rank {lora_settings.rank} on {', '.join(lora_settings.keys)} of {count} layers: "
        f"{trainable:,} trainable parameters; {len(datasets['train'])} training and {len(datasets['valid'])} "
        f"validation sequences",
        file=sys.stderr,
    )
    config = adapter_config(
        model,
        lora_settings,
        count,
        path.resolve(),
        {
            "data": str(settings["data"]),
            "max_seq_length": max_seq_length,
            "objective": {
                "ar_weight": training.ar_weight,
                "eps": training.eps,
                "self_conditioning": training.self_conditioning,
            },
        },
    )
    trainer = Trainer(model, datasets, training, out, config, fill, report=lambda line: print(line, flush=True))
    with stop_on_interrupt(lambda line: print(line, file=sys.stderr, flush=True)) as stop:
        try:
            result = trainer.run(resume=resume, stop=stop)
        except KeyboardInterrupt:
            print("stopped without saving", file=sys.stderr)
            return 130
    if result.history:
        print(
            f"{result.tokens_per_second:,.0f} tokens/s · peak memory {format_bytes(result.peak_memory)}",
            file=sys.stderr,
        )
    if "test" in datasets and not result.interrupted:
        loss = trainer.evaluate(datasets["test"], int(settings.get("test_batches", 500)))
        print(f"test loss {loss:.3f}", flush=True)
    return 130 if result.interrupted else 0


__all__ = ["lora", "TrainingError"]

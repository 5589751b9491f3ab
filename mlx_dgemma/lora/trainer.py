"""The training loop: LoRA on the block-diffusion objective, with progress, evaluation, saves and resumes.

Every random choice of iteration i (its batch, its blocks and noise, LoRA dropout) is drawn from (seed, i)
alone, so a run resumed from a save continues exactly as the uninterrupted run would have: the save holds
the adapter, the optimizer's state and the iteration, which is all the state there is.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.tuner.utils import build_schedule

from ..memory import format_bytes
from ..model import Model
from .adapters import AdapterError, load_adapter_weights, save_adapter, save_json, save_safetensors
from .data import Dataset, length_batches, training_batch
from .objective import DEFAULT_EPS, DEFAULT_SELF_CONDITIONING, BlockNoise, DiffusionBatch, loss_parts, make_batch

OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "training_state.json"
_BATCH_ARRAYS = ("inputs", "valid", "canvas", "targets", "canvas_mask", "coin", "ar_index", "ar_targets", "ar_mask")
OPTIMIZERS = {"adam": optim.Adam, "adamw": optim.AdamW, "sgd": optim.SGD, "adafactor": optim.Adafactor}


class TrainingError(ValueError):
    """A training run that cannot start or resume; one line."""


@dataclass
class TrainingConfig:
    iters: int = 1000
    batch_size: int = 4
    learning_rate: float = 1e-5
    optimizer: str = "adam"
    optimizer_config: dict[str, Any] = field(default_factory=dict)
    lr_schedule: dict[str, Any] | None = None
    steps_per_report: int = 10
    steps_per_eval: int = 200
    val_batches: int = 25
    save_every: int = 100
    grad_checkpoint: bool = False
    seed: int = 0
    ar_weight: float = 1.0
    eps: float = DEFAULT_EPS
    self_conditioning: float = DEFAULT_SELF_CONDITIONING
    # One compiled graph per step (loss, gradients and the optimizer's update), as mlx-lm's trainer does.
    compile: bool = True

    def check(self) -> None:
        positive = ("iters", "batch_size", "steps_per_report", "save_every")
        for name in positive:
            if getattr(self, name) < 1:
                raise TrainingError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.steps_per_eval < 0:
            raise TrainingError(f"--steps-per-eval must be 0 (never) or more, got {self.steps_per_eval}")
        if self.val_batches < -1 or self.val_batches == 0:
            raise TrainingError(f"--val-batches must be -1 (all) or at least 1, got {self.val_batches}")
        if not self.learning_rate > 0:
            raise TrainingError(f"--learning-rate must be positive, got {self.learning_rate}")
        if self.optimizer not in OPTIMIZERS:
            raise TrainingError(f"unknown optimizer {self.optimizer!r}; choose from {', '.join(OPTIMIZERS)}")
        if self.ar_weight < 0:
            raise TrainingError(f"--ar-weight must be 0 or more, got {self.ar_weight}")
        if not 0 < self.eps < 1:
            raise TrainingError(f"eps must be in (0, 1), got {self.eps}")
        if not 0 <= self.self_conditioning <= 1:
            raise TrainingError(f"self_conditioning must be in [0, 1], got {self.self_conditioning}")


@dataclass
class TrainingResult:
    iteration: int
    interrupted: bool
    history: list[dict[str, Any]]
    adapter_path: Path
    tokens_per_second: float = 0.0
    peak_memory: int = 0


def build_optimizer(config: TrainingConfig) -> optim.Optimizer:
    learning_rate = build_schedule(config.lr_schedule) if config.lr_schedule else config.learning_rate
    try:
        return OPTIMIZERS[config.optimizer](learning_rate=learning_rate, **config.optimizer_config)
    except TypeError as error:
        raise TrainingError(f"optimizer_config for {config.optimizer}: {' '.join(str(error).split())}") from None


def _format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


@contextlib.contextmanager
def stop_on_interrupt(report: Callable[[str], None]) -> Iterator[Callable[[], bool]]:
    """Within: the first Ctrl-C asks the loop to stop after its step (and save); a second one stops at once."""
    if threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return
    asked = threading.Event()
    previous = signal.getsignal(signal.SIGINT)

    def handler(signum, frame):
        if asked.is_set():
            signal.signal(signal.SIGINT, previous)
            raise KeyboardInterrupt
        asked.set()
        report("interrupted: saving the adapter after this step (Ctrl-C again to quit without saving)")

    signal.signal(signal.SIGINT, handler)
    try:
        yield asked.is_set
    finally:
        signal.signal(signal.SIGINT, previous)


class Trainer:
    """Trains the LoRA layers already on `model` (see adapters.add_lora) and saves them into `adapter_path`."""

    def __init__(
        self,
        model: Model,
        datasets: dict[str, Dataset],
        config: TrainingConfig,
        adapter_path: str | Path,
        adapter_config: dict[str, Any],
        fill_id: int,
        report: Callable[[str], None] = print,
    ):
        config.check()
        self.model = model
        self.datasets = datasets
        self.config = config
        self.adapter_path = Path(adapter_path)
        self.adapter_config = adapter_config
        self.fill_id = fill_id
        self.report = report
        self.canvas = model.config.canvas_length
        self.vocab = model.text_config.vocab_size
        self.train_set = datasets["train"]
        self.train_batches = length_batches(self.train_set.examples, config.batch_size)
        if not self.train_batches:
            raise TrainingError(
                f"train.jsonl has {len(self.train_set)} usable records, fewer than --batch-size {config.batch_size}"
            )
        valid = datasets.get("valid")
        if valid is not None and len(valid) < config.batch_size:
            raise TrainingError(
                f"valid.jsonl has {len(valid)} usable records, fewer than --batch-size {config.batch_size}"
            )
        self.optimizer = build_optimizer(config)
        self.history: list[dict[str, Any]] = []

        def loss(model, batch):
            parts = loss_parts(model, batch, config.ar_weight, config.grad_checkpoint)
            return parts.loss, parts.diffusion, parts.autoregressive

        self._loss_and_grad = nn.value_and_grad(model, loss)
        self._compiled: Callable[..., tuple[mx.array, mx.array, mx.array]] | None = None

    # ------------------------------------------------------------- one iteration

    def batch_for(self, iteration: int):
        """The batch of 0-based `iteration`, with its noise, as the loss takes it."""
        examples = training_batch(self.train_set.examples, self.train_batches, self.config.seed, iteration)
        rng = np.random.default_rng([self.config.seed, iteration, 0xD1FF])
        noise = BlockNoise.draw(rng, examples, self.canvas, self.vocab, self.config.eps, self.config.self_conditioning)
        # Compiled steps are reused across batches of nearby lengths, padded to a few sizes.
        return make_batch(examples, noise, self.canvas, self.fill_id, bucket=self.config.compile)

    def _update(self, batch: DiffusionBatch) -> tuple[mx.array, mx.array, mx.array]:
        (loss, diffusion, autoregressive), grads = self._loss_and_grad(self.model, batch)
        self.optimizer.update(self.model, grads)
        return loss, diffusion, autoregressive

    def _compiled_update(self, batch: DiffusionBatch) -> tuple[mx.array, mx.array, mx.array]:
        """`_update` as one compiled graph, its state (the model's arrays, the optimizer's, the random key)
        captured; built at the first step, after a resume has put the optimizer's state in place. A batch's host
        values (context, padding, whether any row is self-conditioned) key the compiled graphs with its shapes."""
        if self._compiled is None:
            state = [self.model.state, self.optimizer.state, mx.random.state]

            def update(arrays, context, padded, first_pass):
                rows = arrays["inputs"].shape[0]
                host = np.full(rows, first_pass, dtype=bool)
                return self._update(DiffusionBatch(**arrays, context=context, padded=padded, self_condition=host))

            self._compiled = mx.compile(update, inputs=state, outputs=state)
        arrays = {name: getattr(batch, name) for name in _BATCH_ARRAYS}
        return self._compiled(arrays, batch.context, batch.padded, bool(batch.self_condition.any()))

    def step(self, iteration: int) -> tuple[float, float, float, int]:
        batch = self.batch_for(iteration)
        mx.random.seed((self.config.seed * 1_000_003 + iteration) % 2**63)  # LoRA dropout
        update = self._compiled_update if self.config.compile else self._update
        loss, diffusion, autoregressive = update(batch)
        mx.eval(self.model.trainable_parameters(), self.optimizer.state, loss, diffusion, autoregressive)
        return loss.item(), diffusion.item(), autoregressive.item(), batch.tokens

    def evaluate(self, dataset: Dataset, num_batches: int) -> float:
        """The mean loss over the first `num_batches` batches of `dataset` (-1: all), with the same noise at every
        evaluation so that values compare across a run."""
        batches = length_batches(dataset.examples, self.config.batch_size)
        if num_batches > 0:
            batches = batches[:num_batches]
        rng = np.random.default_rng([self.config.seed, 0xE7A1])
        total = weight = 0.0
        was_training = self.model.training
        self.model.eval()
        for indices in batches:
            examples = [dataset.examples[i] for i in indices]
            noise = BlockNoise.draw(
                rng, examples, self.canvas, self.vocab, self.config.eps, self.config.self_conditioning
            )
            parts = loss_parts(
                self.model, make_batch(examples, noise, self.canvas, self.fill_id), self.config.ar_weight
            )
            mx.eval(parts.loss, parts.canvas_tokens)
            total += parts.loss.item() * parts.canvas_tokens.item()
            weight += parts.canvas_tokens.item()
        if was_training:
            self.model.train()
        return total / max(weight, 1)

    # ------------------------------------------------------------- saves

    def save(self, iteration: int) -> None:
        """The adapter, then the optimizer's state and the iteration (each file renamed over the old one)."""
        state = {"iteration": iteration, "config": asdict(self.config)}
        save_adapter(self.model, self.adapter_path, {**self.adapter_config, "iterations": iteration})
        save_safetensors(self.adapter_path / OPTIMIZER_FILE, dict(tree_flatten(self.optimizer.state)))
        save_json(self.adapter_path / STATE_FILE, state)

    def restore(self) -> int:
        """Load the last save from `adapter_path`; returns its iteration."""
        where = self.adapter_path
        state_path = where / STATE_FILE
        if not state_path.is_file() or not (where / OPTIMIZER_FILE).is_file():
            raise TrainingError(f"nothing to resume in {where}: no {STATE_FILE} and {OPTIMIZER_FILE} from a save")
        try:
            state = json.loads(state_path.read_text())
            iteration = int(state["iteration"])
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise TrainingError(f"cannot read {state_path}: {' '.join(str(error).split())}") from None
        try:
            load_adapter_weights(self.model, where)
        except AdapterError as error:
            raise TrainingError(f"--resume: {error}") from None
        saved = state.get("config") or {}
        changed = [
            f"{name} {saved[name]} there, {value} here"
            for name, value in asdict(self.config).items()
            if name in saved and name != "iters" and saved[name] != value
        ]
        if changed:
            self.report(f"note: resuming with other settings than the saved run ({'; '.join(changed)})")
        flat = mx.load(str(where / OPTIMIZER_FILE))
        self.optimizer.init(self.model.trainable_parameters())
        restored = tree_unflatten(list(flat.items()))
        self.optimizer.state = _merge_state(self.optimizer.state, restored)
        mx.eval(self.optimizer.state)
        return iteration

    # ------------------------------------------------------------- the loop

    def run(self, resume: bool = False, stop: Callable[[], bool] | None = None) -> TrainingResult:
        config = self.config
        start = self.restore() if resume else 0
        if resume:
            self.report(f"resuming from iteration {start} saved in {self.adapter_path}")
        if start >= config.iters:
            self.report(f"already trained {start} iterations (--iters {config.iters}): nothing to do")
            return TrainingResult(start, False, self.history, self.adapter_path)
        self.model.train()
        valid = self.datasets.get("valid")
        if valid is not None and config.steps_per_eval and start == 0:
            self._validate(0, valid)
        mx.reset_peak_memory()
        interval_loss = interval_diffusion = interval_ar = 0.0
        interval_steps = interval_tokens = 0
        interval_start = run_start = time.perf_counter()
        total_tokens = 0
        iteration = start
        interrupted = False
        stop = stop or (lambda: False)
        while iteration < config.iters:
            loss, diffusion, autoregressive, tokens = self.step(iteration)
            if not math.isfinite(loss):
                self.save(iteration)
                raise TrainingError(
                    f"the loss became {loss} at iteration {iteration + 1}; lower --learning-rate "
                    f"(the adapter of iteration {iteration} is saved in {self.adapter_path})"
                )
            iteration += 1
            interval_loss += loss
            interval_diffusion += diffusion
            interval_ar += autoregressive
            interval_steps += 1
            interval_tokens += tokens
            total_tokens += tokens
            if iteration % config.steps_per_report == 0 or iteration == config.iters:
                now = time.perf_counter()
                rate = interval_tokens / max(now - interval_start, 1e-9)
                per_step = (now - run_start) / (iteration - start)
                entry = {
                    "iteration": iteration,
                    "train_loss": interval_loss / interval_steps,
                    "diffusion_loss": interval_diffusion / interval_steps,
                    "ar_loss": interval_ar / interval_steps,
                    "tokens_per_second": rate,
                    "peak_memory": mx.get_peak_memory(),
                    "learning_rate": float(self.optimizer.learning_rate.item()),
                }
                self.history.append(entry)
                self.report(
                    f"iter {iteration}/{config.iters} · train loss {entry['train_loss']:.3f} "
                    f"(diffusion {entry['diffusion_loss']:.3f}, ar {entry['ar_loss']:.3f}) · "
                    f"lr {entry['learning_rate']:.2e} · {rate:,.0f} tokens/s · "
                    f"peak {format_bytes(entry['peak_memory'])} · "
                    f"ETA {_format_duration(per_step * (config.iters - iteration))}"
                )
                interval_loss = interval_diffusion = interval_ar = 0.0
                interval_steps = interval_tokens = 0
                interval_start = now
            if (
                valid is not None
                and config.steps_per_eval
                and (iteration % config.steps_per_eval == 0 or iteration == config.iters)
            ):
                self._validate(iteration, valid)
            if iteration % config.save_every == 0 or iteration == config.iters:
                self.save(iteration)
            if stop() and iteration < config.iters:
                interrupted = True
                self.save(iteration)
                break
        elapsed = time.perf_counter() - run_start
        if interrupted:
            self.report(
                f"stopped at iteration {iteration}: adapter saved in {self.adapter_path} (continue with --resume)"
            )
        else:
            self.report(f"saved the adapter in {self.adapter_path} ({iteration} iterations)")
        self.model.eval()
        return TrainingResult(
            iteration,
            interrupted,
            self.history,
            self.adapter_path,
            total_tokens / max(elapsed, 1e-9),
            mx.get_peak_memory(),
        )

    def _validate(self, iteration: int, valid: Dataset) -> None:
        began = time.perf_counter()
        loss = self.evaluate(valid, self.config.val_batches)
        self.history.append({"iteration": iteration, "val_loss": loss})
        self.report(f"iter {iteration}/{self.config.iters} · val loss {loss:.3f} ({time.perf_counter() - began:.1f}s)")


def _merge_state(initial: Any, saved: Any) -> Any:
    """`initial` (the optimizer's fresh state, shaped like the parameters) with the saved arrays put in."""
    if isinstance(initial, dict):
        saved = saved if isinstance(saved, dict) else {}
        return {key: _merge_state(value, saved.get(key)) for key, value in initial.items()} | {
            key: value for key, value in saved.items() if key not in initial
        }
    if isinstance(initial, list):
        saved = saved if isinstance(saved, list) else []
        return [_merge_state(value, saved[i] if i < len(saved) else None) for i, value in enumerate(initial)]
    return saved if saved is not None else initial

"""LoRA adapters: which layers get one, and the files that hold them.

The low-rank layers are mlx-lm's (`mlx_lm.tuner.lora`): `LoRALinear` over a float or quantized linear (LoRA,
or QLoRA on a 4-bit conversion), `LoRASwitchLinear` over a stack of experts, which adds each token's expert's
low-rank update after the gathered matmul. The router is never adapted: it stays as the base model has it.

An adapter directory holds `adapters.safetensors` (the `lora_a`/`lora_b` arrays, under the model's parameter
names) and `adapter_config.json`, in the spirit of mlx-lm's: `fine_tune_type`, `num_layers`, and
`lora_parameters` {rank, scale, dropout, keys}, plus `base_model`: the shape of the model it was trained on and
a fingerprint of that model's norm weights (unquantized in every conversion), so an adapter is refused by a
model it was not trained for. Files are written under a temporary name, then renamed over the old ones.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear
from mlx_lm.tuner.lora import LoRALinear, LoRASwitchLinear
from mlx_lm.tuner.utils import linear_to_lora_layers

from ..config import ModelConfig
from ..memory import WeightsFileError, read_safetensors_header
from ..model import Model

ADAPTER_FILE = "adapters.safetensors"
CONFIG_FILE = "adapter_config.json"
FORMAT = "mlx-dgemma-lora/1"

ATTENTION_KEYS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
MLP_KEYS = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
EXPERT_KEYS = ("experts.gate_up_proj", "experts.down_proj")
DEFAULT_KEYS = ATTENTION_KEYS + MLP_KEYS
# Names a user may give for a group of keys.
KEY_GROUPS = {"attention": ATTENTION_KEYS, "mlp": MLP_KEYS, "experts": EXPERT_KEYS, "default": DEFAULT_KEYS}
_SHORT = {key.rsplit(".", 1)[1]: key for key in ATTENTION_KEYS + MLP_KEYS}
_ADAPTABLE = (nn.Linear, nn.QuantizedLinear, SwitchLinear, QuantizedSwitchLinear)


class AdapterError(ValueError):
    """An adapter that cannot be made, read or applied; the message is one line."""


@dataclass(frozen=True)
class LoraSettings:
    """What gets a low-rank update: `keys` (module paths inside a layer) of the top `num_layers` layers
    (-1: all), with `rank`, `scale` (the update is scale · x·A·B) and `dropout` on its input."""

    rank: int = 8
    scale: float = 20.0
    dropout: float = 0.0
    num_layers: int = -1
    keys: tuple[str, ...] = field(default=DEFAULT_KEYS)

    def lora_parameters(self) -> dict[str, Any]:
        return {"rank": self.rank, "scale": self.scale, "dropout": self.dropout, "keys": list(self.keys)}


def parse_keys(text: str | Sequence[str]) -> tuple[str, ...]:
    """Keys from a comma list (or a list) of full keys (`self_attn.q_proj`), short names (`q_proj`) or groups
    (`attention`, `mlp`, `experts`, `default`); in a stable order, without repeats."""
    items = text.split(",") if isinstance(text, str) else list(text)
    keys: list[str] = []
    for item in (str(item).strip() for item in items):
        if not item:
            continue
        expanded = KEY_GROUPS.get(item) or ((_SHORT[item],) if item in _SHORT else (item,))
        keys.extend(key for key in expanded if key not in keys)
    if not keys:
        raise AdapterError("no LoRA keys given")
    return tuple(keys)


def add_lora(model: Model, settings: LoraSettings, seed: int | None = None) -> int:
    """Freeze `model` and put LoRA layers where `settings` says; returns how many layers got one. With `seed`,
    the layers' random initial `lora_a` is drawn from it (MLX's global generator, seeded).

    Refuses keys that name no adaptable module in any layer, and the router (the recipe keeps it frozen)."""
    if settings.rank < 1:
        raise AdapterError(f"the LoRA rank must be at least 1, got {settings.rank}")
    if not 0 <= settings.dropout < 1:
        raise AdapterError(f"LoRA dropout must be in [0, 1), got {settings.dropout}")
    layers = model.layers
    if settings.num_layers == 0 or settings.num_layers < -1 or settings.num_layers > len(layers):
        raise AdapterError(f"--lora-layers must be 1 to {len(layers)} (or all), got {settings.num_layers}")
    available: set[str] = set()
    for layer in layers:
        available.update(name for name, module in layer.named_modules() if isinstance(module, _ADAPTABLE))
    for key in settings.keys:
        if "router" in key.split("."):
            raise AdapterError("the router stays frozen: it cannot take a LoRA adapter")
        if key not in available:
            choices = ", ".join(sorted(k for k in available if not k.startswith("router")))
            raise AdapterError(f"no layer has a {key!r} to adapt; choose from {choices} (or attention, mlp, experts)")
    model.freeze()
    if seed is not None:
        mx.random.seed(seed)
    count = len(layers) if settings.num_layers == -1 else settings.num_layers
    linear_to_lora_layers(
        model,
        count,
        {"rank": settings.rank, "scale": settings.scale, "dropout": settings.dropout, "keys": list(settings.keys)},
    )
    return count


def lora_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, (LoRALinear, LoRASwitchLinear))]


def adapter_weights(model: nn.Module) -> dict[str, mx.array]:
    """The adapter's arrays under the model's parameter names."""
    return {name: value for name, value in tree_flatten(model.trainable_parameters())}


# ----------------------------------------------------------------- the base model's identity


def base_shape(config: ModelConfig) -> dict[str, Any]:
    """The shape fields an adapter depends on."""
    text = config.text
    return {
        "vocab_size": text.vocab_size,
        "hidden_size": text.hidden_size,
        "intermediate_size": text.intermediate_size,
        "moe_intermediate_size": text.moe_intermediate_size,
        "num_hidden_layers": text.num_hidden_layers,
        "num_attention_heads": text.num_attention_heads,
        "num_experts": text.num_experts,
        "layers": [[shape.layer_type, shape.head_dim, shape.num_key_value_heads] for shape in text.layers],
        "canvas_length": config.canvas_length,
    }


def shape_difference(trained: dict[str, Any], here: dict[str, Any]) -> str | None:
    """How the shape an adapter was trained on (`base_shape`) differs from `here`, in words; None if it does not."""
    for key, value in here.items():
        if key in trained and trained[key] != value:
            return "the layer layout" if key == "layers" else f"{key} {trained[key]} there, {value} here"
    return None


def weights_fingerprint(model: Model) -> str:
    """A hash of the model's norm weights and layer scalars, rounded to bfloat16: the same for a checkpoint and
    its conversions (those stay unquantized), different for another checkpoint of the same shape."""
    digest = hashlib.sha256()
    arrays: list[tuple[str, mx.array]] = []
    for name, value in tree_flatten(model.parameters()):
        leaf = name.rsplit(".", 2)
        if name.endswith("layer_scalar") or (leaf[-1] == "weight" and "norm" in leaf[-2]):
            arrays.append((name, value))
    for name, value in sorted(arrays):
        digest.update(name.encode())
        digest.update(memoryview(mx.array(value.astype(mx.bfloat16).astype(mx.float32))).tobytes())
    return "sha256:" + digest.hexdigest()


def base_identity(model: Model, path: str | Path | None) -> dict[str, Any]:
    return {
        "path": str(path) if path is not None else None,
        "shape": base_shape(model.config),
        "weights_fingerprint": weights_fingerprint(model),
    }


def check_base(model: Model, config: dict[str, Any], where: Path, strict: bool = True) -> None:
    """Refuse an adapter trained on another model (its shape, or with `strict` its weights)."""
    base = config.get("base_model")
    if not isinstance(base, dict):
        return  # an mlx-lm adapter: nothing recorded to compare; shapes are checked on load
    difference = shape_difference(base.get("shape") or {}, base_shape(model.config))
    if difference:
        raise AdapterError(f"the adapter at {where} was trained on another model ({difference})")
    fingerprint = base.get("weights_fingerprint")
    if strict and fingerprint and fingerprint != weights_fingerprint(model):
        trained_on = f" ({base['path']})" if base.get("path") else ""
        raise AdapterError(
            f"the adapter at {where} was trained on another checkpoint of this shape{trained_on}: its norm weights "
            "differ from this model's"
        )


def adapter_digest(directory: Path) -> str | None:
    """The sha256 of the adapter's arrays file (None when there is none to read)."""
    digest = hashlib.sha256()
    try:
        with open(directory / ADAPTER_FILE, "rb") as file:
            while chunk := file.read(1 << 20):
                digest.update(chunk)
    except OSError:
        return None
    return "sha256:" + digest.hexdigest()


def fused_into(config: ModelConfig, directory: Path) -> bool:
    """Whether `dgemma fuse` made the model of `config` by merging the adapter at `directory` into its base."""
    fused = config.raw.get("fused_adapter")
    return isinstance(fused, dict) and bool(fused.get("digest")) and fused["digest"] == adapter_digest(directory)


def check_not_fused(model: Model, directory: Path) -> None:
    """Refuse to add an adapter to a model that `dgemma fuse` already merged it into: the fused model keeps its
    base's norm weights, so the base check alone would let the update in twice."""
    if fused_into(model.config, directory):
        raise AdapterError(f"the adapter at {directory} is already fused into this model (dgemma fuse): load it alone")


# ----------------------------------------------------------------- files


def write_atomically(path: Path, write: Any) -> None:
    """Call `write(temporary_path)`, then rename the result over `path`."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(temporary)
        os.replace(temporary, path)
    finally:
        if temporary.exists():
            temporary.unlink()


def save_safetensors(path: Path, arrays: dict[str, mx.array], metadata: dict[str, str] | None = None) -> None:
    # mx.save_safetensors appends ".safetensors" to a name without it: give the temporary file that suffix.
    def write(temporary: Path) -> None:
        target = temporary.with_name(temporary.name + ".safetensors")
        mx.save_safetensors(str(target), arrays, metadata=metadata or {})
        os.replace(target, temporary)

    write_atomically(path, write)


def save_json(path: Path, data: dict[str, Any]) -> None:
    write_atomically(path, lambda temporary: temporary.write_text(json.dumps(data, indent=2) + "\n"))


def adapter_config(
    model: Model, settings: LoraSettings, num_layers: int, base_path: str | Path | None, extra: dict[str, Any]
) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "fine_tune_type": "lora",
        "num_layers": num_layers,
        "lora_parameters": settings.lora_parameters(),
        "model": str(base_path) if base_path is not None else None,
        "base_model": base_identity(model, base_path),
        **extra,
    }


def save_adapter(model: Model, directory: str | Path, config: dict[str, Any]) -> Path:
    """Write `model`'s adapter arrays and `config` into `directory` (each file renamed over the old one)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights = adapter_weights(model)
    mx.eval(weights)
    save_safetensors(directory / ADAPTER_FILE, weights)
    save_json(directory / CONFIG_FILE, config)
    return directory


def read_adapter_config(directory: str | Path) -> dict[str, Any]:
    directory = Path(directory)
    if not directory.is_dir():
        raise AdapterError(f"no adapter directory at {directory}")
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise AdapterError(f"no {CONFIG_FILE} in {directory}: not an adapter directory")
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise AdapterError(f"cannot read {path}: {' '.join(str(error).split())}") from None
    if not isinstance(config, dict):
        raise AdapterError(f"{path} does not hold a JSON object")
    return config


def settings_from_config(config: dict[str, Any], where: Path) -> tuple[LoraSettings, int]:
    kind = config.get("fine_tune_type", "lora")
    if kind != "lora":
        raise AdapterError(f"the adapter at {where} is a {kind!r} fine-tune; only LoRA adapters are supported")
    params = config.get("lora_parameters")
    if not isinstance(params, dict) or "rank" not in params:
        raise AdapterError(f"{where / CONFIG_FILE} has no lora_parameters with a rank")
    try:
        num_layers = int(config.get("num_layers", -1))
        settings = LoraSettings(
            rank=int(params["rank"]),
            scale=float(params.get("scale", 20.0)),
            dropout=float(params.get("dropout", 0.0)),
            num_layers=num_layers,
            keys=parse_keys(params.get("keys") or DEFAULT_KEYS),
        )
    except (TypeError, ValueError) as error:
        raise AdapterError(f"{where / CONFIG_FILE}: {' '.join(str(error).split())}") from None
    return settings, num_layers


def load_adapter_weights(model: Model, directory: Path, expected: Iterable[str] | None = None) -> None:
    """Load `adapters.safetensors` into a model that has the adapter's LoRA layers: every array must be one of
    its adapter parameters, with its shape, and every adapter parameter must be there."""
    path = directory / ADAPTER_FILE
    if not path.is_file():
        raise AdapterError(f"no {ADAPTER_FILE} in {directory}")
    try:
        weights = mx.load(str(path))
    except Exception as error:  # MLX raises bare RuntimeError/ValueError on bad files
        raise AdapterError(f"cannot read {path}: {' '.join(str(error).split())}") from None
    params = adapter_weights(model)
    for name, value in weights.items():
        if name not in params:
            raise AdapterError(f"{path} holds {name}, which is not an adapter parameter of this model")
        if value.shape != params[name].shape:
            raise AdapterError(
                f"{path} does not match the model its {CONFIG_FILE} describes (another rank?): {name} is "
                f"{tuple(value.shape)} there, {tuple(params[name].shape)} here"
            )
    missing = sorted(set(params) - set(weights))
    if missing:
        raise AdapterError(f"{path} lacks {len(missing)} adapter arrays of this model (first: {missing[0]})")
    model.load_weights(list(weights.items()), strict=False)
    mx.eval(model.parameters())


def apply_adapter(model: Model, path: str | Path, strict_base: bool = True) -> dict[str, Any]:
    """Put the LoRA adapter at `path` (a directory) on `model`, in place; returns its config.

    One-line `AdapterError`s for a missing or unreadable adapter, one trained on another base model (shape, or
    with `strict_base` weights), or arrays that do not match its config (another rank, other keys)."""
    directory = Path(path).expanduser()
    config = read_adapter_config(directory)
    check_base(model, config, directory, strict_base)
    check_not_fused(model, directory)
    settings, _ = settings_from_config(config, directory)
    if settings.num_layers > len(model.layers):
        raise AdapterError(
            f"the adapter at {directory} adapts {settings.num_layers} layers; this model has {len(model.layers)}"
        )
    add_lora(model, settings)
    load_adapter_weights(model, directory)
    model.eval()
    return config


def describe_adapter(path: str | Path, config: ModelConfig) -> dict[str, Any]:
    """What `dgemma info --adapter` shows of the adapter at `path` beside the model of `config`: its LoRA settings,
    parameters and size, the model it was trained on, and whether that model's shape is this one's. Reads the
    adapter's config and its arrays file's header only; one-line `AdapterError`s as `apply_adapter` gives."""
    directory = Path(path).expanduser()
    adapter = read_adapter_config(directory)
    settings, num_layers = settings_from_config(adapter, directory)
    file = directory / ADAPTER_FILE
    if not file.is_file():
        raise AdapterError(f"no {ADAPTER_FILE} in {directory}")
    try:
        header = read_safetensors_header(file)
    except WeightsFileError as error:
        raise AdapterError(str(error)) from None
    base = adapter.get("base_model") if isinstance(adapter.get("base_model"), dict) else {}
    layers = len(config.text.layers)
    return {
        "path": str(directory),
        **settings.lora_parameters(),
        "layers": layers if num_layers == -1 else num_layers,
        "of_layers": layers,
        "parameters": sum(math.prod(entry["shape"]) for entry in header.values()),
        "bytes": file.stat().st_size,
        "trained_on": base.get("path") or adapter.get("model"),
        "shape_difference": shape_difference(base.get("shape") or {}, base_shape(config)),
        "fused_into_this_model": fused_into(config, directory),
    }


def fuse_adapter(model: Model) -> Model:
    """Merge every LoRA layer into its base layer (dequantized, merged, requantized as it was)."""
    fused = [(name, module.fuse()) for name, module in lora_modules(model)]
    if fused:
        from mlx.utils import tree_unflatten

        model.update_modules(tree_unflatten(fused))
    return model

"""The time to encode one image: the vision tower, then the prefill of its tokens, us beside mlx-vlm.

    python -m bench image                      # bench shape (4-layer 384-wide tower), float32, CPU: about a minute
    python -m bench image --shape quick        # the tests' toy tower: a smoke run of seconds
    python -m bench image --shape released     # DiffusionGemma 26B-A4B's tower and text, random weights (GPU)
    python -m bench image --help

One synthetic image (seeded numpy pixels made into a PIL image of `--image-size`) is preprocessed once by our
`prepare_image` (transformers' Gemma 4 processor's rules); both runtimes take those very pixels: us as the
processor's patches and positions (`PreparedImage`), mlx-vlm as the channel-first resized image its own processor
makes (rebuilt from the same patches; its tower patchifies it into the same patches). The prompt is a short text,
begin-of-image, the image's soft tokens as image tokens, end-of-image, a short text. Each runtime runs in a
process of its own, one after the other, on the same weights: at `bench` and `quick` a float32 checkpoint written
by the transformers reference with the shape's vision tower (tests/checkpoints.py, cached under OUT/checkpoints);
at `released` random weights built in memory (text 4-bit by each runtime's own recipe, the tower in bfloat16 in
both, the same values for the same tensor names). Per runtime, after loading:

- tower: the image's soft tokens (patch embedding, the tower's layers, pooling, standardization, the projection
  into the text width). Ours: `Model.image_features(pixel_values, position_ids)`; mlx-vlm:
  `model.model.encoder.get_image_features(pixels)` (the call its prefill makes);
- prefill: the prompt through the causal encoder into a fresh cache, the soft tokens given. Ours:
  `Model.encode(ids, cache, image_features=[...])`; mlx-vlm has no entry that takes soft tokens, so its prefill
  runs `diffusion_prefill_cache(ids, mm_token_type_ids=...)` without pixels: the image positions hold a pad
  token's embedding instead of the soft tokens, the same computation otherwise (the image's run bidirectional);
- encode: pixels to a filled cache, each runtime's own path: ours `generate.prefill(model, cache, ids,
  images=[prepared])`, mlx-vlm `diffusion_prefill_cache(ids, pixel_values=..., mm_token_type_ids=...)`.

Cold: the first tower call and the first prefill of the process (MLX builds its kernels and buffers then). Warm:
the median of `--repeats` calls of each. Every timing ends with the result evaluated (`mx.eval` of the features
or of the cache's keys and values). The two runtimes' soft tokens are compared (max abs difference): the
comparison is on the same computation only if they agree.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from .build import REPO
from .orchestrate import add_run_options, quiet_wait
from .shapes import PRESETS, VISION, Shape

DEFAULT_OUT = REPO / "bench" / "out" / "image"
RUNTIMES = ("us", "mlx-vlm")
MARKER = "bench_image.json"
# The image tokens: the test tokenizer's (tests/checkpoints.py) in checkpoints it writes; the released ids where
# the vocabulary holds them (synthetic weights at the released shape).
TEST_IMAGE_TOKENS = dict(boi_token_id=17, eoi_token_id=18, image_token_id=19)
RELEASED_IMAGE_TOKENS = dict(boi_token_id=255999, eoi_token_id=258882, image_token_id=258880)
TEXT_BEFORE, TEXT_AFTER = 24, 8  # text tokens around the image in the prompt


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench image", description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="bench", choices=sorted(VISION), help="a preset shape (default bench)")
    parser.add_argument(
        "--image-size",
        default=None,
        metavar="WxH",
        help="the synthetic image's size before resizing (default 640x480; quick 64x48)",
    )
    parser.add_argument("--repeats", type=int, default=None, help="warm calls timed per figure (default 5; quick 2)")
    parser.add_argument("--runtimes", default=",".join(RUNTIMES), help="comma-separated: us, mlx-vlm")
    parser.add_argument("--seed", type=int, default=0, help="seed of the image, the prompt and the weights")
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help=f"checkpoints, logs, JSON (default {DEFAULT_OUT})"
    )
    add_run_options(parser, "runtime", "the runtimes")
    args = parser.parse_args(argv)
    args.runtimes = [name.strip() for name in args.runtimes.split(",") if name.strip()]
    unknown = sorted(set(args.runtimes) - set(RUNTIMES))
    if unknown or not args.runtimes:
        parser.error(f"--runtimes: choose from {', '.join(RUNTIMES)} (got {unknown or 'none'})")
    size = args.image_size or "x".join(map(str, VISION[args.shape][2]))
    try:
        width, height = (int(side) for side in size.lower().split("x"))
    except ValueError:
        parser.error(f"--image-size {size!r}: expected WIDTHxHEIGHT, e.g. 640x480")
    if min(width, height) < 1:
        parser.error("--image-size: both sides must be positive")
    args.image_size = (width, height)
    args.repeats = args.repeats or (2 if args.shape == "quick" else 5)
    args.quiet_wait = quiet_wait(args.quiet_wait, args.shape == "quick")
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    return args


# -- the image, the prompt, the weights -------------------------------------------------------------------------------


def synthetic_image(width: int, height: int, seed: int):
    """Smooth colour gradients with noise on top: an RGB PIL image of the stated size."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack(
        [x / max(width - 1, 1), y / max(height - 1, 1), 0.5 + 0.5 * np.sin((x + y) / max(width, height) * 6.28)], -1
    )
    pixels = np.clip(255 * (0.8 * base + 0.2 * rng.random(base.shape, dtype=np.float32)), 0, 255)
    return Image.fromarray(pixels.astype(np.uint8), "RGB")


def channel_first(pixel_values: np.ndarray, position_ids: np.ndarray, patch: int) -> np.ndarray:
    """The resized image, (3, height, width), rebuilt from the processor's real patches (row-major patches, each
    patch's pixels row-major, channels innermost): what mlx-vlm's own processor hands its tower."""
    real = position_ids[:, 0] >= 0
    columns, rows = int(position_ids[real, 0].max()) + 1, int(position_ids[real, 1].max()) + 1
    patches = pixel_values[real].reshape(rows, columns, patch, patch, 3)
    return np.ascontiguousarray(patches.transpose(4, 0, 2, 1, 3).reshape(3, rows * patch, columns * patch))


def image_tokens(shape: Shape) -> dict[str, int]:
    if shape.source == "synthetic" and shape.text["vocab_size"] > max(RELEASED_IMAGE_TOKENS.values()):
        return dict(RELEASED_IMAGE_TOKENS)
    return dict(TEST_IMAGE_TOKENS)


def prompt_ids(tokens: dict[str, int], soft: int, vocab: int, seed: int) -> list[int]:
    """bos, text, begin-of-image, the image tokens, end-of-image, text; text ids clear of the special ones."""
    rng = np.random.default_rng(seed + 1)
    special = set(tokens.values())
    text = [int(t) for t in rng.integers(100, vocab, 2 * (TEXT_BEFORE + TEXT_AFTER)) if int(t) not in special]
    image = [tokens["boi_token_id"], *[tokens["image_token_id"]] * soft, tokens["eoi_token_id"]]
    return [2, *text[:TEXT_BEFORE], *image, *text[TEXT_BEFORE : TEXT_BEFORE + TEXT_AFTER]]


def checkpoint_path(shape: Shape, vision: dict[str, Any], out: Path, seed: int) -> Path:
    key = json.dumps([shape.text, vision, shape.canvas_length, shape.dtype, seed], sort_keys=True)
    return out / "checkpoints" / f"image-{shape.name}-{shape.dtype}-{hashlib.sha1(key.encode()).hexdigest()[:8]}"


def build_checkpoint(spec: dict[str, Any]) -> None:
    """In its own process (torch): the reference model with the shape's tower, written in Google's layout."""
    import shutil

    import torch

    from .build import helper_from_tests

    checkpoints = helper_from_tests("checkpoints")
    dest = Path(spec["dest"])
    staging = dest.with_name(dest.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    start = time.perf_counter()
    model = checkpoints.build_reference_model(
        seed=spec["seed"], canvas_length=spec["canvas_length"], vision_overrides=spec["vision"], **spec["text"]
    )
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[spec["dtype"]]
    checkpoints.save_reference_checkpoint(model, staging, dtype=dtype)
    (staging / MARKER).write_text(json.dumps(spec, indent=2))
    shutil.rmtree(dest, ignore_errors=True)
    staging.rename(dest)
    print(f"[bench image] wrote {dest} in {time.perf_counter() - start:.1f} s", file=sys.stderr)


# -- the worker: one runtime in its own process ---------------------------------------------------------------------


def _vision_params(model: Any, dtype: Any, seed: int) -> None:
    """Random tower weights keyed by tensor name (the same in both runtimes, whose names agree): linear weights
    ~ N(0, 1/fan-in), norms and the standardization's scale around 1, its bias around 0, position tables ~ 0.5."""
    import zlib

    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_unflatten

    fresh = []
    for name, array in tree_flatten(model.parameters()):
        if ".vision_tower." not in name and ".embed_vision." not in name:
            continue
        key = mx.random.key((zlib.crc32(name.encode()) ^ seed) & 0xFFFFFFFF)
        if name.endswith(("norm.weight", "std_scale")):
            value = mx.random.uniform(0.7, 1.3, array.shape, key=key)
        elif name.endswith("std_bias"):
            value = mx.random.uniform(-0.5, 0.5, array.shape, key=key)
        elif name.endswith("position_embedding_table"):
            value = 0.5 * mx.random.normal(array.shape, key=key)
        elif array.ndim == 2:
            value = mx.random.normal(array.shape, key=key) / float(np.sqrt(array.shape[-1]))
        else:
            value = mx.zeros(array.shape) if "min" in name else mx.ones(array.shape)
        fresh.append((name, value.astype(dtype)))
        mx.eval(fresh[-1][1])
    model.update(tree_unflatten(fresh))


def _synthetic(runtime: str, spec: dict[str, Any]) -> Any:
    """Random weights in memory: the text quantized by the runtime's own recipe, the tower kept float in both."""
    from . import synthetic

    config = {**spec["config"]}
    bits, group_size, dtype = spec["bits"], spec["group_size"], spec["dtype"]

    def float_tower(predicate):
        return lambda path, module: False if "vision" in path else predicate(path, module)

    if runtime == "us":
        from mlx_dgemma import CudaOptions, Model, ModelConfig
        from mlx_dgemma.backends import cuda

        from .runtimes.ours import _mixed_recipe

        options = CudaOptions(enabled=True)
        plugin = cuda.available()
        if plugin:
            cuda.prepare(options)
        model = synthetic.build(
            lambda: Model(ModelConfig.from_dict(config)),
            lambda model: float_tower(_mixed_recipe(bits, group_size)) if bits else None,
            dtype,
            bits,
            group_size,
            spec["seed"],
        )
        if plugin:
            cuda.apply(model, options)
    else:
        from mlx_vlm.models.diffusion_gemma import Model, ModelConfig

        from .runtimes.vlm import _vlm_predicate

        model = synthetic.build(
            lambda: Model(ModelConfig.from_dict(config)),
            lambda model: float_tower(_vlm_predicate(model)),
            dtype,
            bits,
            group_size,
            spec["seed"],
        )
    _vision_params(model, synthetic.DTYPES[dtype], spec["seed"])
    return model


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    import mlx.core as mx

    runtime = spec["runtime"]
    inputs = np.load(spec["inputs"])
    ids = mx.array(inputs["input_ids"][None])
    image_token = spec["image_tokens"]["image_token_id"]
    env = {"mlx": mx.__version__, "device": str(mx.default_device())}
    try:
        env["openblas_loaded"] = "libopenblas" in Path("/proc/self/maps").read_text()
    except OSError:
        env["openblas_loaded"] = None
    start = time.perf_counter()
    if runtime == "us":
        from mlx_dgemma import PreparedImage, load_model
        from mlx_dgemma.generate import prefill

        env["mlx_dgemma"] = _version("mlx-dgemma")
        model = _synthetic("us", spec) if spec["source"] == "synthetic" else load_model(spec["checkpoint"])
        prepared = PreparedImage(
            inputs["pixel_values"], inputs["position_ids"], int(inputs["soft_tokens"]), tuple(inputs["size"]), "bench"
        )

        def tower():
            return model.image_features(prepared.pixel_values, prepared.position_ids)

        def prefill_given(features):
            cache = model.make_cache()
            model.encode(ids, cache, image_features=[features])
            return cache.state

        def encode():
            cache = model.make_cache()
            prefill(model, cache, ids, images=[prepared])
            return cache.state
    else:
        from mlx_vlm.utils import load_model as vlm_load

        env["mlx_vlm"] = _version("mlx-vlm")
        model = _synthetic("mlx-vlm", spec) if spec["source"] == "synthetic" else vlm_load(Path(spec["checkpoint"]))
        pixels = mx.array(inputs["channel_first"][None])
        types = (ids == image_token).astype(mx.int32)

        def tower():
            return model.model.encoder.get_image_features(pixels)[0]

        def run_prefill(pixel_values):
            cache = model.diffusion_prefill_cache(
                ids,
                attention_mask=None,
                cache=model.make_cache(),
                pixel_values=pixel_values,
                mm_token_type_ids=types,
                prefill_step_size=None,
                chunk_prefill=False,
            )
            return [c.state for c in cache]

        def prefill_given(features):
            return run_prefill(None)

        def encode():
            return run_prefill(pixels)

    mx.eval(model.parameters())
    load_s = time.perf_counter() - start

    def timed(fn, *args):
        begin = time.perf_counter()
        result = fn(*args)
        mx.eval(result)
        return time.perf_counter() - begin, result

    mx.reset_peak_memory()
    tower_cold, features = timed(tower)
    prefill_cold, _ = timed(prefill_given, features)
    warm = {"tower": [], "prefill": [], "encode": []}
    for _ in range(spec["repeats"]):
        warm["tower"].append(timed(tower)[0])
        warm["prefill"].append(timed(prefill_given, features)[0])
        warm["encode"].append(timed(encode)[0])
    np.save(spec["features"], np.array(features.astype(mx.float32)))
    return {
        "runtime": runtime,
        "status": "ok",
        "env": env,
        "load_s": load_s,
        "tower_cold_s": tower_cold,
        "prefill_cold_s": prefill_cold,
        "tower_s": statistics.median(warm["tower"]),
        "prefill_s": statistics.median(warm["prefill"]),
        "encode_s": statistics.median(warm["encode"]),
        "warm": warm,
        "features_shape": list(features.shape),
        "mlx_peak_gb": mx.get_peak_memory() / 1e9,
    }


def _version(name: str) -> str | None:
    import importlib.metadata

    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


# -- the parent ------------------------------------------------------------------------------------------------------


def _ms(seconds: float | None) -> str:
    return "—" if seconds is None else f"{1000 * seconds:,.1f}"


def table(document: dict[str, Any]) -> str:
    results = document["runtimes"]
    names = list(results)
    ok = {name: r for name, r in results.items() if r.get("status") == "ok"}
    header = ["figure", *names]
    if "us" in ok and "mlx-vlm" in ok:
        header.append("mlx-vlm ÷ us")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    rows = [
        ("tower, cold (ms)", "tower_cold_s"),
        ("tower, warm median (ms)", "tower_s"),
        ("prefill of the prompt, cold (ms)", "prefill_cold_s"),
        ("prefill of the prompt, warm median (ms)", "prefill_s"),
        ("encode: pixels to cache, warm median (ms)", "encode_s"),
        ("load (ms)", "load_s"),
    ]
    for label, key in rows:
        cells = [_ms(results[n].get(key)) if n in ok else results[n].get("status", "?") for n in names]
        if len(header) > len(names) + 1:
            cells.append(f"{ok['mlx-vlm'][key] / ok['us'][key]:.2f}×")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    peak = [f"{results[n]['mlx_peak_gb']:.2f}" if n in ok else "—" for n in names]
    lines.append("| MLX peak memory (GB) | " + " | ".join(peak) + (" | |" if len(header) > len(names) + 1 else " |"))
    load = [f"{results[n]['foreign_cores']:.2f}" if results[n].get("foreign_cores") is not None else "—" for n in names]
    lines.append(
        "| other processes' load (cores) | " + " | ".join(load) + (" | |" if len(header) > len(names) + 1 else " |")
    )
    blas = ["yes" if results[n].get("env", {}).get("openblas_loaded") else "no" for n in names]
    lines.append("| OpenBLAS loaded | " + " | ".join(blas) + (" | |" if len(header) > len(names) + 1 else " |"))
    text = "\n".join(lines)
    notes = [f"- **{n}** {r.get('status')}: {r.get('error')}" for n, r in results.items() if r.get("error")]
    return text + ("\n\n" + "\n".join(notes) if notes else "")


def _layers(count: int) -> str:
    return f"{count} layer{'' if count == 1 else 's'}"


def header(document: dict[str, Any]) -> str:
    shape, vision, image = document["shape"], document["vision_config"], document["image"]
    machine = document["machine"]
    text = shape["text"]
    agreement = document.get("features_max_abs_diff")
    lines = [
        f"## One image encoded: '{shape['name']}' shape, {shape['dtype']}"
        + (f", text {shape['bits']}-bit" if shape.get("bits") else ""),
        "",
        f"`{document['command']}`",
        "",
        f"Machine: {machine.get('cpu', '?')}, {machine.get('cores')} cores"
        + (f", {', '.join(machine['gpus'])}" if machine.get("gpus") else "")
        + f"; MLX device {document.get('device', '?')}; BLAS: "
        + ("OpenBLAS preloaded" if document["openblas"] else "MLX's bundled BLAS")
        + f"; git {document['git'].get('commit', '?')}"
        + (" (modified)" if document["git"].get("modified") else ""),
        "",
        f"Tower: {_layers(vision['num_hidden_layers'])} × {vision['hidden_size']}, {vision['num_attention_heads']} "
        f"heads × {vision['head_dim']}, MLP {vision['intermediate_size']}, {vision['patch_size']}-pixel patches "
        f"pooled {vision['pooling_kernel_size']}×{vision['pooling_kernel_size']}. Text: "
        f"{_layers(text['num_hidden_layers'])} × {text['hidden_size']}, {text['num_experts']} experts "
        f"top-{text['top_k_experts']}. Image "
        f"{image['width']}×{image['height']} resized to {image['resized'][1]}×{image['resized'][0]}: "
        f"{image['patches']} patches, {image['soft_tokens']} soft tokens; prompt {image['prompt_tokens']} tokens "
        f"({TEXT_BEFORE + TEXT_AFTER + 1} text, begin/end-of-image, the image tokens). Warm: median of "
        f"{document['repeats']}.",
        "",
        "Soft tokens, us vs mlx-vlm: "
        + (
            "not compared"
            if agreement is None
            else f"max abs diff {agreement:.2e} (max abs value {document['features_max_abs']:.2f})"
        ),
    ]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    from mlx_dgemma.images import VisionSettings, prepare_image

    from .cli import OPENBLAS, _relay, child_env, git_state, machine
    from .orchestrate import LoadMeter, wait_until_quiet

    shape = PRESETS[args.shape]
    vision, budget, _ = VISION[args.shape]
    out = args.out.resolve()
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    openblas = OPENBLAS.is_file() and not args.no_openblas
    started = time.perf_counter()
    tokens = image_tokens(shape)

    width, height = args.image_size
    settings = VisionSettings(
        patch_size=vision["patch_size"], pooling_kernel_size=vision["pooling_kernel_size"], max_soft_tokens=budget
    )
    prepared = prepare_image(synthetic_image(width, height, args.seed), settings)
    ids = prompt_ids(tokens, prepared.num_soft_tokens, shape.text["vocab_size"], args.seed)
    inputs = out / f"{shape.name}-inputs.npz"
    np.savez(
        inputs,
        input_ids=np.array(ids, dtype=np.int32),
        pixel_values=prepared.pixel_values,
        position_ids=prepared.position_ids,
        channel_first=channel_first(prepared.pixel_values, prepared.position_ids, settings.patch_size),
        soft_tokens=prepared.num_soft_tokens,
        size=np.array(prepared.size),
    )
    document: dict[str, Any] = {
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python -m bench image " + " ".join(shlex.quote(a) for a in argv),
        "machine": machine(),
        "git": git_state(),
        "shape": shape.to_json(),
        "vision_config": vision,
        "image_tokens": tokens,
        "openblas": openblas,
        "repeats": args.repeats,
        "image": {
            "width": width,
            "height": height,
            "resized": list(prepared.size),
            "patches": int((prepared.position_ids[:, 0] >= 0).sum()),
            "soft_tokens": prepared.num_soft_tokens,
            "prompt_tokens": len(ids),
            "seed": args.seed,
        },
        "checkpoint": None,
        "runtimes": {},
    }
    checkpoint = None
    if shape.source == "checkpoint":
        checkpoint = checkpoint_path(shape, vision, out, args.seed)
        if args.rebuild or not (checkpoint / MARKER).is_file():
            print(f"[bench image] building {checkpoint} ...", file=sys.stderr)
            build = {
                "dest": str(checkpoint),
                "text": shape.text,
                "vision": vision,
                "canvas_length": shape.canvas_length,
                "dtype": shape.dtype,
                "seed": args.seed,
            }
            spec_path = logs / f"{shape.name}-build.json"
            spec_path.write_text(json.dumps(build))
            command = [sys.executable, "-m", "bench.image", "--build", str(spec_path)]
            code, *_ = _relay(command, child_env(False, False), logs / f"{shape.name}-build.log", 7200)
            if code != 0 or not (checkpoint / MARKER).is_file():
                raise SystemExit(f"building the checkpoint failed (see {logs / f'{shape.name}-build.log'})")
        document["checkpoint"] = str(checkpoint)
    config = {**shape.config_dict(), "vision_config": vision, **tokens}
    for name in args.runtimes:
        spec = {
            "runtime": name,
            "source": shape.source,
            "checkpoint": str(checkpoint) if checkpoint else None,
            "config": config,
            "dtype": shape.dtype,
            "bits": shape.bits,
            "group_size": shape.group_size,
            "seed": args.seed,
            "repeats": args.repeats,
            "inputs": str(inputs),
            "image_tokens": tokens,
            "features": str(logs / f"{shape.name}-{name}-features.npy"),
        }
        spec_path, result_path = logs / f"{shape.name}-{name}-spec.json", logs / f"{shape.name}-{name}-result.json"
        spec_path.write_text(json.dumps(spec, indent=2))
        result_path.unlink(missing_ok=True)
        waited, _ = wait_until_quiet([], args.quiet_wait)
        print(f"[bench image] {name} ...", file=sys.stderr)
        command = [sys.executable, "-m", "bench.image", "--worker", str(spec_path), str(result_path)]
        meter = LoadMeter([])  # cores other processes keep busy while the worker runs
        log = logs / f"{shape.name}-{name}.log"
        code, timed_out, _, _ = _relay(command, child_env(True, openblas), log, args.timeout)
        foreign = meter.foreign_cores()
        if result_path.is_file():
            document["runtimes"][name] = json.loads(result_path.read_text())
            document["runtimes"][name].update(quiet_wait_s=waited, foreign_cores=foreign)
        else:
            status = "timeout" if timed_out else "error"
            document["runtimes"][name] = {
                "runtime": name,
                "status": status,
                "error": f"exit code {code}, see {logs / f'{shape.name}-{name}.log'}",
            }
    ok = [n for n, r in document["runtimes"].items() if r.get("status") == "ok"]
    if ok:
        document["device"] = document["runtimes"][ok[0]]["env"]["device"]
    if "us" in ok and "mlx-vlm" in ok:
        ours = np.load(logs / f"{shape.name}-us-features.npy")
        theirs = np.load(logs / f"{shape.name}-mlx-vlm-features.npy")
        if ours.shape == theirs.shape:
            document["features_max_abs_diff"] = float(np.abs(ours - theirs).max())
            document["features_max_abs"] = float(np.abs(ours).max())
        else:
            document["features_shape_mismatch"] = [list(ours.shape), list(theirs.shape)]
    document["wall_s"] = time.perf_counter() - started
    markdown = f"{header(document)}\n\n{table(document)}\n"
    json_path, md_path = out / f"{shape.name}.json", out / f"{shape.name}.md"
    json_path.write_text(json.dumps(document, indent=2, default=str))
    md_path.write_text(markdown)
    print(markdown)
    print(f"wrote {json_path}, {md_path} (wall {document['wall_s']:.0f} s)", file=sys.stderr)
    return 0 if all(r.get("status") == "ok" for r in document["runtimes"].values()) else 1


def _entry(argv: list[str]) -> int:
    if argv[:1] == ["--build"]:
        build_checkpoint(json.loads(Path(argv[1]).read_text()))
        return 0
    if argv[:1] == ["--worker"]:
        spec = json.loads(Path(argv[1]).read_text())
        try:
            result = worker(spec)
        except Exception as error:  # reported in the table, the traceback in the log
            import traceback

            traceback.print_exc()
            result = {"runtime": spec["runtime"], "status": "error", "error": f"{type(error).__name__}: {error}"}
        Path(argv[2]).write_text(json.dumps(result, indent=2))
        return 0 if result["status"] == "ok" else 1
    return main(argv)


if __name__ == "__main__":
    sys.exit(_entry(sys.argv[1:]))

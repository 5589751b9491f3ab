"""Benchmark checkpoints: `python -m bench.build SHAPE.json DEST` (run in its own process by the CLI).

A float checkpoint in Google's layout is written by the transformers
reference (`tests/checkpoints.py`: random weights, norms spread around 1,
layer scalars within 5%), so all three runtimes read the very same file. With
`bits` set, our converter then makes the mixed-recipe MLX conversion of it
(4- or 8-bit experts, 8-bit dense layers and embedding), which both MLX
runtimes load. A finished checkpoint carries `bench_shape.json`; one without
it (an interrupted build) is rebuilt.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
import time
from pathlib import Path
from types import ModuleType

from .shapes import Shape

REPO = Path(__file__).resolve().parent.parent
MARKER = "bench_shape.json"


def helper_from_tests(name: str) -> ModuleType:
    """A helper module of tests/ (`checkpoints`, `tokenizer_fixture`), imported by path: it is test code, not a
    package."""
    spec = importlib.util.spec_from_file_location(f"dgemma_test_{name}", REPO / "tests" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def is_complete(path: Path, shape: Shape) -> bool:
    marker = path / MARKER
    if not marker.is_file():
        return False
    try:
        stored = json.loads(marker.read_text())
    except json.JSONDecodeError:
        return False
    return stored.get("text") == shape.text and stored.get("canvas_length") == shape.canvas_length


def build_float(shape: Shape, dest: Path, seed: int = 0) -> Path:
    import torch

    checkpoints = helper_from_tests("checkpoints")
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[shape.dtype]
    staging = dest.with_name(dest.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    start = time.perf_counter()
    model = checkpoints.build_reference_model(seed=seed, canvas_length=shape.canvas_length, **shape.text)
    checkpoints.save_reference_checkpoint(model, staging, dtype=dtype)
    (staging / MARKER).write_text(json.dumps({**shape.to_json(), "seed": seed}, indent=2))
    shutil.rmtree(dest, ignore_errors=True)
    staging.rename(dest)
    print(f"[build] wrote {dest} in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return dest


def build_quantized(shape: Shape, source: Path, dest: Path) -> Path:
    sys.path.insert(0, str(REPO))
    from mlx_dgemma.convert import convert_checkpoint

    start = time.perf_counter()
    convert_checkpoint(
        source, dest, dtype=shape.dtype, bits=shape.bits, group_size=shape.group_size, recipe="mixed", force=True
    )
    (dest / MARKER).write_text(json.dumps(shape.to_json(), indent=2))
    print(f"[build] converted {dest} in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return dest


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) not in (2, 3):
        print("usage: python -m bench.build SHAPE.json DEST [FLOAT_SOURCE]", file=sys.stderr)
        return 2
    shape = Shape.from_json(json.loads(Path(argv[0]).read_text()))
    dest = Path(argv[1])
    if len(argv) == 3:
        build_quantized(shape, Path(argv[2]), dest)
    else:
        build_float(shape, dest)
    return 0


if __name__ == "__main__":
    sys.exit(main())

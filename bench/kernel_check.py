"""Compile our CUDA kernels with NVRTC, as MLX would, on a machine without a GPU.

    pip install nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cuda-cccl
    python -m bench.kernel_check --libmlx PATH/TO/mlx/lib/libmlx.so   # of an mlx-cuda build

`mx.fast.cuda_kernel` wraps a kernel's body in a signature it writes itself
and compiles it at first use with NVRTC, against device headers that MLX
keeps inside libmlx.so. This tool does the same for every kernel of
`mlx_dgemma.backends.cuda_kernels` at the shapes the released model and the bench shape
use: it takes the headers out of the given libmlx.so (an mlx-cuda build,
e.g. unpacked from shared/device/mlx-cuda), writes each kernel's source the
way MLX does, compiles it for `--arch` and prints the registers, shared
memory and spills ptxas reports. Exit status 1 if any kernel fails to
compile. It says nothing about whether a kernel computes the right thing:
only a GPU run does.
"""

from __future__ import annotations

import argparse
import ctypes
import re
import sys
import tempfile
from pathlib import Path

# Types as MLX writes them into a kernel's signature.
CUDA_TYPES = {"bfloat16": "__nv_bfloat16", "uint32": "uint32_t", "int32": "int32_t", "float32": "float"}
# What MLX prepends to a custom kernel (mlx/backend/cuda/custom_kernel.cpp).
DEFAULT_HEADER = (
    '\n#include "mlx/backend/cuda/device/utils.cuh"\n\n#include <cooperative_groups.h>\n\n'
    "#define inf cuda::std::numeric_limits<float>::infinity()\n\n"
)
RELEASED = {"hidden": 2816, "inner": 704, "experts": 128, "top_k": 8}
BENCH = {"hidden": 512, "inner": 256, "experts": 32, "top_k": 4}


def variants():
    """(kernel, input dtypes, template) for every kernel at the shapes we run."""
    from mlx_dgemma.backends import cuda_kernels as kernels

    b, u, i, f = "bfloat16", "uint32", "int32", "float32"
    matmul = (b, u, b, b, u, i)
    for shape in (RELEASED, BENCH):
        hidden, inner = shape["hidden"], shape["inner"]
        for rows in (16, 32):
            for kind, kernel in kernels.FUSED_QMM.items():
                for k, n, glu in ((hidden, 2 * inner, True), (inner, hidden, False)):
                    template = {"K": k, "N": n, "MT": rows // 16, "GATHER": glu, "GLU": glu, "ACT": 0}
                    if kind == "staged":
                        if not kernels.staged_fits(k, rows):
                            continue
                        template["STAGES"] = kernels.stages(rows)
                    yield kernel, (*matmul, i), template
        yield kernels.MOE_LAYOUT, (u,), {"EXPERTS": shape["experts"], "TILE": 16}
        yield kernels.MOE_COMBINE, (b, i, f), {"H": hidden, "TOP_K": shape["top_k"]}
        for scores in (b, f):
            yield kernels.ROUTER_TOP_K, (scores, scores), {"EXPERTS": shape["experts"], "TOP_K": shape["top_k"]}
    for act in (1, 2, 3):
        kernel = kernels.FUSED_QMM["staged"]
        template = {"K": 2816, "N": 1408, "MT": 1, "GATHER": True, "GLU": True, "ACT": act, "STAGES": 3}
        yield kernel, (*matmul, i), template


def kernel_source(kernel, dtypes: tuple[str, ...], template: dict) -> str:
    """The translation unit MLX's cuda_kernel builds (custom_kernel.cpp's build_kernel). Outputs are bf16 but for the
    layout's and the router's."""
    out_types = {"slots": "int32", "tile_experts": "uint32", "sources": "int32", "used": "int32"}
    out_types |= {"indices": "uint32", "weights": "float32"}
    text = DEFAULT_HEADER + kernel.header + "namespace mlx::core::cu {\n\nnamespace cg = cooperative_groups;\n\n"
    text += f"__global__ void custom_kernel_{kernel.name}(\n"
    for name, dtype in zip(kernel.inputs, dtypes, strict=True):
        text += f"    const {CUDA_TYPES[dtype]}* {name},\n"
        for suffix, kind in (("_shape", "Shape"), ("_strides", "Strides"), ("_ndim", "int")):
            if name + suffix in kernel.source:
                text += f"    const __grid_constant__ {kind} {name}{suffix},\n"
    text += ",\n".join(f"    {CUDA_TYPES[out_types.get(name, 'bfloat16')]}* {name}" for name in kernel.outputs)
    text += ") {\n"
    for key, value in template.items():
        text += f"  constexpr {'bool' if isinstance(value, bool) else 'int'} {key} = {str(value).lower()};\n"
    return text + "\n" + kernel.source + "\n}\n\n} // namespace mlx::core::cu\n"


def extract_headers(libmlx: Path, into: Path) -> None:
    """MLX's device headers (utils.cuh and what it includes) out of libmlx.so, where NVRTC finds them by name."""
    data = libmlx.read_bytes()
    texts = []
    for match in re.finditer(rb"// Copyright", data):
        start = match.start()
        if start and data[start - 1] != 0:
            continue
        text = data[start : data.index(b"\0", start)].decode("utf-8", "replace")
        if "#pragma once" in text:
            texts.append(text)
    utils = [t for t in texts if "using Shape = cuda::std::array<int32_t, MAX_NDIM>" in t]
    complex_ = [t for t in texts if "using complex_t = cuda::std::complex<T>" in t]
    config = libmlx.parent.parent / "include/mlx/backend/cuda/device/config.h"
    if not utils or not complex_ or not config.is_file():
        raise SystemExit(f"error: {libmlx} does not hold MLX's CUDA device headers (is it an mlx-cuda build?)")
    device = into / "mlx/backend/cuda/device"
    device.mkdir(parents=True)
    (device / "utils.cuh").write_text(utils[0])
    (device / "complex.cuh").write_text(complex_[0])
    (device / "config.h").write_text(config.read_text())


def nvrtc() -> tuple[ctypes.CDLL, list[str]]:
    """The NVRTC library and the CUDA include folders of the pip packages nvidia-cuda-{nvrtc,runtime,cccl}."""
    try:
        import nvidia
    except ImportError:
        raise SystemExit("error: pip install nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cuda-cccl") from None
    for root in map(Path, nvidia.__path__):
        for lib in sorted(root.glob("cu*/lib/libnvrtc.so.*")):
            include = lib.parent.parent / "include"
            return ctypes.CDLL(str(lib)), [str(include), str(include / "cccl")]
    raise SystemExit("error: no libnvrtc.so under the nvidia package; pip install nvidia-cuda-nvrtc")


def compile_source(lib: ctypes.CDLL, source: str, options: list[str]) -> tuple[bool, str]:
    program = ctypes.c_void_p()
    if lib.nvrtcCreateProgram(ctypes.byref(program), source.encode(), b"kernel.cu", 0, None, None):
        return False, "nvrtcCreateProgram failed"
    encoded = [o.encode() for o in options]
    status = lib.nvrtcCompileProgram(program, len(encoded), (ctypes.c_char_p * len(encoded))(*encoded))
    size = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(program, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetProgramLog(program, log)
    lib.nvrtcDestroyProgram(ctypes.byref(program))
    return status == 0, log.value.decode(errors="replace")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.kernel_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--libmlx", type=Path, required=True, help="libmlx.so of an mlx-cuda build")
    parser.add_argument("--arch", default="sm_90", help="NVRTC's --gpu-architecture (default sm_90: H100/H200)")
    args = parser.parse_args(argv)
    lib, includes = nvrtc()
    failed = 0
    with tempfile.TemporaryDirectory() as headers:
        extract_headers(args.libmlx, Path(headers))
        options = [f"--gpu-architecture={args.arch}", "-std=c++17", "--device-as-default-execution-space"]
        options += [f"--include-path={path}" for path in (headers, *includes)] + ["-Xptxas=-v"]
        for kernel, dtypes, template in variants():
            ok, log = compile_source(lib, kernel_source(kernel, dtypes, template), options)
            usage = "; ".join(re.findall(r"Used \d+ registers[^\n]*|\d+ bytes spill stores", log))
            settings = " ".join(f"{k}={v}" for k, v in template.items())
            print(f"{'ok  ' if ok else 'FAIL'} {kernel.name:<28} {settings:<60} {usage}")
            if not ok:
                failed += 1
                print(log)
    print(f"{failed} of the kernels failed to compile" if failed else "every kernel compiled")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

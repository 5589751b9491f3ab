"""The CPU-only rewrites: tanh-free gelu and soft-cap, split attention, and the malloc policy."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mlx_dgemma import cpu, layers

# Where Debian puts the OpenBLAS that bench/ preloads into MLX.
OPENBLAS = "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0"


def run_with_openblas(code: str, *args: str) -> str:
    """What `python -c code args` prints, run with OpenBLAS preloaded where the machine has it (as bench/ runs MLX)."""
    env = dict(os.environ)
    if os.path.isfile(OPENBLAS):
        env["LD_PRELOAD"] = OPENBLAS
    done = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout


def spread() -> mx.array:
    """Values from tiny to huge, both signs, zero included."""
    magnitudes = np.concatenate([np.geomspace(1e-8, 1e4, 4000), [0.0]])
    return mx.array(np.concatenate([magnitudes, -magnitudes]).astype(np.float32))


@pytest.mark.parametrize("shape", [(8001,), (2, 4000), (16, 39, 256)])
def test_gelu_without_tanh_matches_the_tanh_form(shape):
    """Any shape, as the experts' stacks take (the fused kernels are traced per shape)."""
    size = math.prod(shape)
    x = mx.array(np.resize(np.array(spread()), size).reshape(shape))
    ours, plain = np.array(layers.gelu_tanh(x)), np.array(nn.gelu_approx(x))
    assert np.isfinite(ours).all()
    np.testing.assert_allclose(ours, plain, rtol=2e-6, atol=1e-6)


def test_gelu_of_fixed_shapes_is_the_logistic_to_float32_rounding():
    """x / (1 + e^(−2z)) from float64 math: the fused kernels keep the far negative tail (no 1 − tanh cancellation)."""
    x = np.concatenate([np.linspace(-12, 12, 20001), [-40.0, -1e4, 1e4]]).astype(np.float32)
    ours = np.array(layers.gelu_tanh(mx.array(x))).astype(np.float64)
    z = np.sqrt(2 / np.pi) * (x.astype(np.float64) + 0.044715 * x.astype(np.float64) ** 3)
    exact = x / (1 + np.exp(np.minimum(-2 * z, 700)))
    visible = np.abs(exact) > 1e-30
    assert np.isfinite(ours).all()
    relative = np.abs(ours[visible] / exact[visible] - 1)
    assert relative[np.abs(x[visible]) < 4].max() < 2e-6  # z rounded to float32 adds ~1e-7·|z|
    assert relative.max() < 2e-5


def test_saturating_exp_holds_at_e88():
    x = mx.array(np.array([87.0, 88.0, 89.0, 1e4, np.inf], dtype=np.float32))
    ours = np.array(cpu.exp(x, saturate=True)).astype(np.float64)
    assert np.isfinite(ours).all()
    np.testing.assert_allclose(ours[:2], np.exp([87.0, 88.0]), rtol=8e-8 * 88)  # x·log2(e) rounded to float32
    assert (ours[2:] == ours[1]).all()


def test_soft_cap_without_tanh_matches_the_tanh_form():
    x = spread()
    ours, plain = np.array(layers.soft_cap(x, 30.0)), np.array(mx.tanh(x / 30.0) * 30.0)
    assert np.isfinite(ours).all() and np.abs(ours).max() <= 30.0
    np.testing.assert_allclose(ours, plain, rtol=0, atol=1e-5)


def test_bf16_keeps_the_tanh_form():
    x = spread().astype(mx.bfloat16)
    np.testing.assert_array_equal(
        np.array(layers.gelu_tanh(x).astype(mx.float32)), np.array(nn.gelu_approx(x).astype(mx.float32))
    )


@pytest.mark.parametrize("mask_shape", [(2, 1, 5, 9), (1, 1, 5, 9), (2, 1, 1, 9), None])
def test_cpu_attention_matches_the_fused_kernel(mask_shape):
    """Keys-major scores under every mask shape the model makes: per row and query, shared, per row only, none."""
    generator = np.random.default_rng(0)
    queries = mx.array(generator.normal(size=(2, 6, 5, 8)).astype(np.float32))
    keys, values = (mx.array(generator.normal(size=(2, 3, 9, 8)).astype(np.float32)) for _ in range(2))
    mask = None
    if mask_shape is not None:
        allowed = generator.random(mask_shape) < 0.6
        allowed[..., 0] = True  # every query sees at least one key
        mask = mx.array(allowed)
    ours = layers.attend(queries, keys, values, mask)
    fused = mx.fast.scaled_dot_product_attention(queries, keys, values, scale=1.0, mask=mask)
    np.testing.assert_allclose(np.array(ours), np.array(fused), rtol=1e-5, atol=1e-5)


def test_rms_norm_rows_do_not_depend_on_the_row_blocks():
    """Each row's norm is the same however many rows its block holds, with OpenBLAS loaded as bench/ loads it.
    (The norm once summed its squares by a BLAS matrix-vector product, which rounds some rows differently by how
    many rows it is given: 3 cores gave other tokens than 2.)"""
    code = (
        "import mlx.core as mx, numpy as np\n"
        "from mlx_dgemma.cpu import RowBlocks, one_blas_thread\n"
        "from mlx_dgemma.layers import rms_normalize\n"
        "one_blas_thread()\n"
        "x = mx.array(np.random.default_rng(1).standard_normal((1, 256, 512)).astype(np.float32))\n"
        "whole = np.array(rms_normalize(x, 1e-6))\n"
        "for count in (2, 3, 5, 7):\n"
        "    blocks = RowBlocks(256, count=count)\n"
        "    parts = blocks.join(blocks.map(lambda part: rms_normalize(part, 1e-6), blocks.split(x)), axis=1)\n"
        "    print(count, float(np.abs(np.array(parts) - whole).max()))\n"
    )
    out = run_with_openblas(code)
    assert out.split() == ["2", "0.0", "3", "0.0", "5", "0.0", "7", "0.0"], out


def test_a_float32_step_does_not_depend_on_the_cores_with_openblas(tmp_path):
    """The same logits, bit for bit, over 1, 2, 3 and 5 cores, with OpenBLAS loaded as bench/ loads it, where the C
    kernels run the layers (heads that fill their panels): self-conditioning and the encoder's last layer run in C
    too, so no BLAS call is left whose rounding could depend on how many rows a block holds. (MLX's own float32
    matmuls, where a layer cannot take the kernels, go to that BLAS, whose rounding can.)"""
    from checkpoints import build_reference_model, save_reference_checkpoint

    path = save_reference_checkpoint(build_reference_model(seed=0, head_dim=32, global_head_dim=64), tmp_path / "m")
    code = (
        "import ctypes, sys, mlx.core as mx, numpy as np, mlx_dgemma\n"
        "from mlx_dgemma import cpu, host_vocab, moe, layers, model\n"
        "ours = mlx_dgemma.load_model(sys.argv[1])\n"
        "blas = hasattr(ctypes.CDLL(None), 'openblas_get_config')\n"
        "print(blas, all(layer.runs_on_host(mx.float32) for layer in ours.layers))\n"
        "rng = np.random.default_rng(5)\n"
        "prompt, canvas = mx.array(rng.integers(0, 384, (1, 27))), mx.array(rng.integers(0, 384, (1, 16)))\n"
        "runs = []\n"
        "for cores in (1, 2, 3, 5):\n"
        "    cpu.block_count = lambda length, cores=cores: min(cores, length)\n"
        "    for module in (model, layers, moe, host_vocab):\n"
        "        module.cpu_cores = lambda cores=cores: cores\n"
        "    cache = ours.make_cache()\n"
        "    ours.encode(prompt, cache)\n"
        "    first = ours.denoise(canvas, cache)\n"
        "    runs.append(np.concatenate([np.array(first), np.array(ours.denoise(canvas, cache, first / 0.6))]))\n"
        "print(*(float(np.abs(run - runs[0]).max()) for run in runs[1:]))\n"
    )
    out = run_with_openblas(code, str(path))
    loaded, in_c, *differences = out.split()
    assert loaded == str(os.path.isfile(OPENBLAS)) and in_c == "True", out
    assert differences == ["0.0", "0.0", "0.0"], out


def _policy_in_subprocess(env: dict[str, str]) -> str:
    code = "from mlx_dgemma.cpu import reuse_freed_memory as r; print(r(), r())"
    done = subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the malloc policy is glibc's")
def test_malloc_policy_applies_once_and_can_be_refused():
    assert _policy_in_subprocess({"DGEMMA_KEEP_MALLOC": ""}) == "True True"
    assert _policy_in_subprocess({"DGEMMA_KEEP_MALLOC": "1"}) == "False False"


def test_fast_exp_is_exp_to_float32_rounding():
    x = mx.array(np.concatenate([np.linspace(-200, 88, 200001), [-np.inf, 0.0, -0.0]]).astype(np.float32))
    ours = np.array(cpu.exp(x)).astype(np.float64)
    exact = np.exp(np.array(x).astype(np.float64))
    normal = exact > 2e-38
    # The polynomial's 2.5e-7, plus rounding x·log2(e) to float32 (2^-24 of it, and log2(e) itself): 8e-8·|x|.
    relative = np.abs(ours[normal] / exact[normal] - 1)
    assert (relative <= 3e-7 + 8e-8 * np.abs(np.array(x)[normal])).all()
    assert relative[np.abs(np.array(x)[normal]) < 1].max() < 3e-7
    # Below float32's normal range the result is 0 or a tiny number, never garbage.
    assert (ours[~normal] >= 0).all() and (ours[~normal] < 2e-38).all()
    assert ours[-3] < 2e-38 and ours[-2] == ours[-1] == 1.0


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no CPU affinity on this system")
def test_cpu_cores_are_the_ones_this_process_may_use():
    """Held to one core (as `taskset` or a container's cpuset does), the CPU path spreads its work over one."""
    first = min(os.sched_getaffinity(0))
    code = f"import os; os.sched_setaffinity(0, {{{first}}}); from mlx_dgemma import cpu; print(cpu.cpu_cores())"
    held = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert held.stdout.strip() == "1", held.stderr
    assert cpu.cpu_cores() == len(os.sched_getaffinity(0))

"""The `dgemma` command line, end to end on small random-weight checkpoints.

Chat runs in a pseudo-terminal (Ctrl-C and Ctrl-D as a person types them) and
through pipes; generate, info and the error paths run through `main()`, the
function behind the console script, or in a subprocess where the process
boundary matters (stdin, exit status, no traceback).
"""

from __future__ import annotations

import fcntl
import io
import json
import os
import pty
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest
from checkpoints import build_reference_model, save_reference_checkpoint
from safetensors.numpy import load_file
from tokenizer_fixture import write_tokenizer

import mlx_dgemma.memory as memory
from mlx_dgemma import cli
from mlx_dgemma.cli import common, views
from mlx_dgemma.cli import info as info_command
from mlx_dgemma.config import ModelConfig

CONTEXT = 256  # the test checkpoints' max_position_embeddings: small, so "beyond the context" is cheap
CANVAS = 16
FAST = ["--steps", "4", "--max-tokens", "16", "--seed", "3"]
VISION_PREFIXES = ("model.encoder.vision_tower.", "model.encoder.embed_vision.")


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    """A Hugging Face layout checkpoint (float32) with a real tokenizer and chat template."""
    path = tmp_path_factory.mktemp("cli") / "hf"
    save_reference_checkpoint(build_reference_model(canvas_length=CANVAS, max_position_embeddings=CONTEXT), path)
    write_tokenizer(path, vocab_size=384)
    return path


@pytest.fixture(scope="session")
def quantized_dir(model_dir, tmp_path_factory) -> Path:
    """The same checkpoint converted to MLX, experts at 4 bits."""
    from mlx_dgemma.convert import convert_checkpoint

    return convert_checkpoint(model_dir, tmp_path_factory.mktemp("cli") / "q4", dtype="float32", bits=4)


@pytest.fixture()
def env(tmp_path) -> dict[str, str]:
    """A subprocess environment with a private home (history file) and no network."""
    home = tmp_path / "home"
    home.mkdir()
    # No bracketed-paste codes around the prompt, whatever the readline version's default.
    inputrc = tmp_path / "inputrc"
    inputrc.write_text("set enable-bracketed-paste off\n")
    values = dict(
        os.environ, HOME=str(home), HF_HUB_OFFLINE="1", PYTHONIOENCODING="utf-8", TERM="xterm", INPUTRC=str(inputrc)
    )
    values.pop("XDG_CACHE_HOME", None)
    values.pop("DGEMMA_MODEL", None)
    return values


def dgemma(*args: str) -> list[str]:
    return [sys.executable, "-m", "mlx_dgemma.cli", *args]


def run_main(capsys, *args: str) -> tuple[int, str, str]:
    """`dgemma ARGS` in this process, through the console script's function."""
    code = cli.main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, fragment: str) -> None:
    assert code != 0
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    assert fragment in lines[0], lines[0]


# ---------------------------------------------------------------- a terminal for chat


def _take_the_terminal() -> None:
    """In the child: the pseudo-terminal becomes its controlling terminal, and SIGINT gets its default action.

    A test runner started in the background by a shell without job control
    hands SIGINT down ignored (POSIX shells do so), and Python keeps an
    ignored SIGINT as it is: every ^C would do nothing.
    """
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Terminal:
    """A child process on a pseudo-terminal that is its controlling terminal, so ^C is SIGINT."""

    def __init__(self, argv: list[str], env: dict[str, str], cols: int = 100, rows: int = 30):
        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
        self.proc = subprocess.Popen(
            argv,
            stdin=slave,
            stdout=slave,
            stderr=slave,
            env={**env, "COLUMNS": str(cols), "LINES": str(rows)},
            start_new_session=True,
            preexec_fn=_take_the_terminal,
        )
        os.close(slave)
        self.fd = master
        self.output = b""
        self.seen = 0  # where the next expect starts

    def _read(self, timeout: float) -> bool:
        ready, _, _ = select.select([self.fd], [], [], max(timeout, 0))
        if not ready:
            return True
        try:
            data = os.read(self.fd, 65536)
        except OSError:  # the child closed the terminal
            return False
        self.output += data
        return bool(data)

    def expect(self, pattern: str, timeout: float = 60) -> bytes:
        """Wait for `pattern` (a regex) after the previous match; returns the output up to its end."""
        regex = re.compile(pattern.encode())
        deadline = time.monotonic() + timeout
        while True:
            match = regex.search(self.output, self.seen)
            if match:
                chunk, self.seen = self.output[self.seen : match.end()], match.end()
                return chunk
            if not self._read(deadline - time.monotonic()) or time.monotonic() > deadline:
                seen = self.output[: self.seen][-1500:].decode(errors="replace")
                tail = self.output[self.seen :].decode(errors="replace")
                raise AssertionError(f"{pattern!r} not seen within {timeout}s after {seen!r}; then: {tail!r}")

    def send(self, text: str) -> None:
        os.write(self.fd, text.encode())

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        os.close(self.fd)


PROMPT = r"\n> "  # the REPL's prompt at the start of a line
STATS = r"\d+ tokens · [\d.]+ tokens/s · [\d.]+ steps/canvas · [\d.]+ tokens/forward"


def test_chat_in_a_terminal(model_dir, env, tmp_path):
    """Several turns with drafts shown in place, every slash command, Ctrl-C mid-reply and at the prompt, Ctrl-D."""
    term = Terminal(dgemma("chat", "--model", str(model_dir), *FAST), env)
    try:
        term.expect(r"/help for commands")
        term.expect(PROMPT)

        term.send("hello there\r")
        turn = term.expect(STATS)
        # The draft area: a dimmed placeholder, then erased (back to the text's column, clear below).
        assert b"\x1b[2m\xe2\x80\xa6" in turn and re.search(rb"\x1b\[\d+G\x1b\[J", turn)
        term.expect(PROMPT)

        term.send("/stats\r")
        stats = term.expect(PROMPT)
        assert b"finish_reason" in stats and b"per canvas" in stats

        term.send("/help\r")
        help_text = term.expect(PROMPT)
        for command in (b"/reset", b"/system", b"/set", b"/stats", b"/history", b"/exit"):
            assert command in help_text

        term.send("/set t_max=0.3\r")  # below t_min: refused, the REPL goes on
        assert b"error: temperatures need 0 <= t_min < t_max" in term.expect(PROMPT)
        term.send("/nonsense\r")
        assert b"unknown command /nonsense" in term.expect(PROMPT)

        # A reply that cannot finish soon, stopped by ^C while it runs.
        term.send("/set steps=100000 max_tokens=32\r")
        assert b"steps=100000 max_tokens=32" in term.expect(PROMPT)
        term.send("tell me a story\r")
        term.expect("\x1b\\[2m\u2026")  # the reply has started
        time.sleep(0.5)
        term.send("\x03")
        assert b"reply interrupted" in term.expect(r"interrupted[^\n]*")
        term.expect(PROMPT, timeout=10)
        # /stats speaks of the interrupted reply, not of the one before it.
        term.send("/stats\r")
        stats = term.expect(PROMPT)
        assert b"the last reply was interrupted: no statistics" in stats and b"finish_reason" not in stats

        # The conversation survived; the next turn works.
        term.send("/set steps=4 max_tokens=16\r")
        term.expect(PROMPT)
        term.send("and then?\r")
        term.expect(STATS)
        term.expect(PROMPT)
        term.send("/history\r")
        history = term.expect(PROMPT)
        for line in (b"user: hello there", b"user: tell me a story", b"user: and then?"):
            assert line in history

        # ^C at the prompt drops the line being typed.
        term.send("half a thought")
        term.expect("half a thought")
        # At a person's pace: CPython's readline loop checks for signals only when
        # select() is interrupted, so a ^C landing while it redraws the echo
        # waits for the next key.
        time.sleep(0.3)
        term.send("\x03")
        term.expect(PROMPT)

        term.send("/system Answer in one word.\r")
        assert b"system prompt set" in term.expect(PROMPT)
        term.send("/reset\r")
        assert b"conversation cleared" in term.expect(PROMPT)
        term.send("/history\r")
        history = term.expect(PROMPT)
        assert b"system: Answer in one word." in history and b"user:" not in history

        term.send("\x04")  # Ctrl-D
        assert term.proc.wait(timeout=20) == 0
    finally:
        term.close()
    assert b"Traceback" not in term.output
    history_file = Path(env["HOME"]) / ".cache" / "mlx-dgemma" / "history"
    lines = history_file.read_text().splitlines()
    assert "hello there" in lines and "/stats" in lines and "half a thought" not in lines


def test_chat_through_pipes(model_dir, env, capsys):
    """Without a terminal: plain lines, no escape sequences; errors on stderr; /quit ends it."""
    code, out, _ = run_main(capsys, "generate", "--model", str(model_dir), *FAST, "--json", "hello there")
    assert code == 0
    expected = json.loads(out)["text"]

    script = "\n".join(
        [
            "hello there",
            "/set steps=0",
            "/set nonsense=1",
            "/set steps=abc",
            "/frobnicate",
            "/system Be brief.",
            "second turn",
            "/stats",
            "/reset",
            "/history",
            "/quit",
            "never sent",
        ]
    )
    result = subprocess.run(
        dgemma("chat", "--model", str(model_dir), *FAST), input=script.encode(), capture_output=True, env=env
    )
    out, err = result.stdout.decode(), result.stderr.decode()
    assert result.returncode == 0, err
    assert b"\x1b" not in result.stdout
    # The first reply is what `generate` gives for the same prompt and sampler settings.
    assert out.startswith(expected), (out[: len(expected) + 20], expected)
    assert len(re.findall(STATS, out)) == 2
    assert "finish_reason" in out
    errors = err.strip().splitlines()
    assert len(errors) == 4 and all(line.startswith("error: ") for line in errors), err
    assert "steps must be a positive integer" in errors[0]
    assert "unknown sampler parameter 'nonsense'" in errors[1]
    assert "steps must be an integer, got 'abc'" in errors[2]
    assert "unknown command /frobnicate" in errors[3]
    after_reset = out.split("conversation cleared", 1)[1]
    assert "system: Be brief." in after_reset and "user: second turn" not in after_reset
    assert "Traceback" not in err


# ---------------------------------------------------------------- generate


def check_result(result: dict, max_tokens: int) -> None:
    assert set(result) == {"text", "thinking", "tokens", "finish_reason", "stats"}
    tokens, stats = result["tokens"], result["stats"]
    assert stats["generation_tokens"] == len(tokens)
    if result["finish_reason"] == "length":
        assert len(tokens) == max_tokens
    else:
        assert result["finish_reason"] == "stop" and len(tokens) < max_tokens
    # Whole canvases: one more than the full ones when it stopped on EOS inside one.
    partial = result["finish_reason"] == "stop" or len(tokens) % CANVAS
    assert stats["canvases"] == len(tokens) // CANVAS + (1 if partial else 0)
    assert stats["canvases"] <= stats["denoising_steps"] <= 4 * stats["canvases"]
    assert stats["tokens_per_forward"] == pytest.approx(len(tokens) / stats["denoising_steps"])


def test_generate_json_and_stdin_on_a_converted_checkpoint(quantized_dir, env):
    """--json gives a consistent result; the same prompt piped on stdin streams the same text."""
    json_run = subprocess.run(
        dgemma("generate", "--model", str(quantized_dir), *FAST, "--json", "Write a haiku."),
        capture_output=True,
        env=env,
    )
    assert json_run.returncode == 0, json_run.stderr.decode()
    assert json_run.stderr == b""
    result = json.loads(json_run.stdout)
    check_result(result, 16)

    piped = subprocess.run(
        dgemma("generate", "--model", str(quantized_dir), *FAST, "--stats"),
        input=b"Write a haiku.\n",
        capture_output=True,
        env=env,
    )
    assert piped.returncode == 0, piped.stderr.decode()
    text = result["text"]
    assert piped.stdout.decode() == text + ("" if text.endswith("\n") else "\n")
    assert re.fullmatch(STATS + r"( · stopped at the token limit)?\n", piped.stderr.decode())


def test_generate_with_a_system_prompt_from_stdin(model_dir, capsys, monkeypatch):
    """`-` reads stdin; --system reaches the model (a longer prompt, the same text as with --json)."""
    monkeypatch.setattr(sys, "stdin", io.StringIO("Say hi.\n"))
    code, streamed, err = run_main(capsys, "generate", "-", "--model", str(model_dir), *FAST, "--system", "Be kind.")
    assert code == 0 and err == ""
    with_system = json.loads(
        run_main(capsys, "generate", "Say hi.", "--model", str(model_dir), *FAST, "--json", "--system", "Be kind.")[1]
    )
    without = json.loads(run_main(capsys, "generate", "Say hi.", "--model", str(model_dir), *FAST, "--json")[1])
    assert with_system["stats"]["prompt_tokens"] > without["stats"]["prompt_tokens"]
    assert streamed.rstrip("\n") == with_system["text"].rstrip("\n")
    check_result(with_system, 16)


# ---------------------------------------------------------------- info and memory


def direct_count(path: Path) -> int:
    tensors = {}
    for shard in path.glob("*.safetensors"):
        tensors.update(load_file(shard))
    return sum(array.size for array in tensors.values())


def vision_count(path: Path) -> int:
    tensors = {}
    for shard in path.glob("*.safetensors"):
        tensors.update(load_file(shard))
    return sum(array.size for name, array in tensors.items() if name.startswith(VISION_PREFIXES))


def test_info(model_dir, quantized_dir, capsys):
    code, out, err = run_main(capsys, "info", str(model_dir))
    assert code == 0 and err == ""
    total, active = re.search(r"parameters\s+([\d,]+) total .*?([\d,]+) active per token", out).groups()
    total, active = int(total.replace(",", "")), int(active.replace(",", ""))
    # Every stored tensor, the vision tower's included.
    assert total == direct_count(model_dir) and vision_count(model_dir) > 0
    # Active: everything but the unused experts' share and the vision tower (once per image, not per token).
    config = ModelConfig.from_path(model_dir)
    text = config.text
    experts = text.num_hidden_layers * 3 * text.num_experts * text.moe_intermediate_size * text.hidden_size
    unused = experts * (text.num_experts - text.top_k_experts) // text.num_experts
    assert active == total - unused - vision_count(model_dir)
    assert re.search(r"6 layers: 5 sliding \(window 12\) \+ 1 full attention", out)
    assert "8 per layer, top 2 per token" in out and "384 tokens" in out and "16 tokens" in out
    assert "quantization   none (float32)" in out
    assert f"at {min(memory.DEFAULT_CONTEXT + memory.IMAGE_PROMPT_TOKENS, CONTEXT)} tokens" in out
    assert re.search(r"vision tower\s+[\d.]+ [KM]?B, loaded: images in", out)
    assert re.search(r"this machine\s+[\d.]+ [KMGT]?B \(physical RAM\): fits", out)

    code, out, _ = run_main(capsys, "info", str(quantized_dir), "--json", "--context", "100")
    facts = json.loads(out)
    assert facts["parameters"]["total"] == total
    assert facts["quantization"].startswith("4-bit affine, group size 64; 8-bit g64: embed_tokens")
    assert facts["disk_bytes"] == sum(f.stat().st_size for f in quantized_dir.glob("*.safetensors"))
    # The KV cache by hand: sliding layers keep window - 1 positions, full layers all 100; float32 K and V.
    kv = (
        sum(
            2
            * shape.num_key_value_heads
            * shape.head_dim
            * (min(100, text.sliding_window - 1) if shape.is_sliding else 100)
            for shape in text.layers
        )
        * 4
    )
    assert facts["memory"]["kv_cache"] == kv
    assert facts["memory"]["dense_layers"] == "quantized" and facts["memory"]["dequantized_dense"] == 0  # the CPU
    assert facts["memory"]["total"] == facts["memory"]["weights"] + kv + facts["memory"]["activations"]
    # The vision tower is loaded (in float), and counted.
    assert 0 < facts["vision_bytes"] < facts["memory"]["weights"] < facts["disk_bytes"]
    assert facts["vision_bytes"] == vision_count(quantized_dir) * 4  # a float32 tower


def test_info_counts_the_dense_layers_cuda_dequantizes(quantized_dir, capsys, monkeypatch):
    from mlx_dgemma.backends import cuda

    monkeypatch.setattr(cuda, "available", lambda: True)
    code, out, _ = run_main(capsys, "info", "--json", str(quantized_dir))
    facts = json.loads(out)["memory"]
    assert code == 0 and facts["dense_layers"] == "dequantized"
    assert facts["dequantized_dense"] == memory.dequantized_dense_bytes(quantized_dir) > 0
    assert facts["total"] == facts["weights"] + facts["dequantized_dense"] + facts["kv_cache"] + facts["activations"]
    code, out, _ = run_main(capsys, "info", str(quantized_dir))
    assert code == 0 and "dense layers dequantized on this GPU" in out


def test_info_says_when_a_model_does_not_fit(model_dir, capsys, monkeypatch):
    monkeypatch.setattr(info_command, "available_memory", lambda: (500, "test memory"))
    code, out, _ = run_main(capsys, "info", str(model_dir))
    assert code == 0
    assert "500 B (test memory): does NOT fit" in out


def test_memory_estimates(model_dir):
    config = ModelConfig.from_path(model_dir)
    # For a float checkpoint the config alone predicts the stored weights exactly.
    assert memory.estimate_memory(config, 64) == memory.estimate_memory(model_dir, 64)
    assert memory.estimate_peak_bytes(model_dir, 200) > memory.estimate_peak_bytes(model_dir, 20)
    assert memory.model_bytes(model_dir) == (model_dir / "model.safetensors").stat().st_size
    assert memory.available_bytes() > 2**30
    with pytest.raises(ValueError, match="context must be a positive"):
        memory.estimate_memory(config, 0)


@pytest.mark.parametrize("room", ["both", "only quantized"])
def test_cuda_keeps_dense_layers_quantized_when_dequantized_would_not_fit(
    model_dir, quantized_dir, capsys, monkeypatch, room
):
    """Under CUDA the dense layers are dequantized at load, unless that would not fit: then they stay quantized."""
    from mlx_dgemma.backends import cuda

    monkeypatch.setattr(cuda, "available", lambda: True)
    extra = memory.dequantized_dense_bytes(quantized_dir)
    assert extra > 0 and memory.dequantized_dense_bytes(model_dir) == 0
    needed = memory.check_fits(quantized_dir).total
    available = needed + (2 * extra if room == "both" else extra // 2)
    monkeypatch.setattr(memory, "available_memory", lambda: (available, "test memory"))
    asked = []

    def load(path, **kwargs):  # the choice is all this test needs: the CUDA plug-in cannot run here
        asked.append(kwargs)
        raise ValueError("stopped before loading")

    monkeypatch.setattr(common, "load", load)
    notes = []
    monkeypatch.setattr(common, "status", notes.append)  # shown only on a terminal
    code, _, err = run_main(capsys, "generate", "--model", str(quantized_dir), *FAST, "hi")
    assert_one_line_error(code, err, "stopped before loading")
    assert asked == [{"cuda_options": None if room == "both" else cuda.CudaOptions(dequantize_dense=False)}]
    assert any("keeping the dense layers quantized" in note for note in notes) == (room == "only quantized")


def test_dequantized_dense_bytes_is_what_loading_adds(quantized_dir):
    """The estimate equals what the CUDA plug-in's float twins (merged weights once) add over the quantized
    layers they replace."""
    from mlx.utils import tree_flatten

    from mlx_dgemma.backends import cuda
    from mlx_dgemma.loader import load_model

    def nbytes(model) -> int:
        # Arrays by identity: a merged projection's parts view its weight and count once.
        arrays = {id(array): array for _, array in tree_flatten(model.parameters())}
        merged = [module for _, module in model.named_modules() if "fused_qkv" in module or "fused_gate_up" in module]
        views = {
            id(module[name].weight)
            for module in merged
            for name in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
            if name in module
        }
        return sum(array.nbytes for key, array in arrays.items() if key not in views)

    model = load_model(quantized_dir)
    before = nbytes(model)
    cuda.apply(model, cuda.CudaOptions(fused_experts=False, router_kernel=False, grouped_attention=False))
    added = nbytes(model) - before
    assert added == memory.dequantized_dense_bytes(quantized_dir)
    assert memory.dequantized_dense_bytes(ModelConfig.from_path(quantized_dir)) > added


def test_a_model_too_big_for_the_machine_is_refused_before_loading(model_dir, capsys, monkeypatch):
    monkeypatch.setattr(memory, "available_memory", lambda: (500, "test memory"))
    monkeypatch.setattr(common, "load", lambda *a, **k: pytest.fail("loaded a model that cannot fit"))
    code, _, err = run_main(capsys, "generate", "--model", str(model_dir), *FAST, "hi")
    assert_one_line_error(code, err, "more than this machine's 500 B (test memory)")


# ---------------------------------------------------------------- errors


@pytest.fixture(scope="module")
def broken_dirs(model_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("broken")
    bad_json = root / "bad_json"
    bad_json.mkdir()
    (bad_json / "config.json").write_text("{not json")
    truncated = root / "truncated"
    truncated.mkdir()
    for file in model_dir.iterdir():
        data = file.read_bytes()
        (truncated / file.name).write_bytes(data[: len(data) // 2] if file.suffix == ".safetensors" else data)
    return {"bad_json": bad_json, "truncated": truncated, "missing": root / "nothing here"}


LONG_PROMPT = " ".join(["hello"] * 300)


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["generate", "--model", "{missing}", "hi"], "no model directory at"),
        (["chat", "--model", "{bad_json}"], "is not valid JSON"),
        (["generate", "--model", "{truncated}", *FAST, "hi"], "cannot read"),
        (["info", "{missing}"], "no model directory at"),
        (["generate", "--model", "{model}", "--steps", "0", "hi"], "'--steps'"),
        (["generate", "--model", "{model}", "--max-tokens", "-1", "hi"], "'--max-tokens'"),
        (["chat", "--model", "{model}", "--set", "t_min=0.9"], "t_min < t_max"),
        (["generate", "--model", "{model}", "--set", "bogus=1", "hi"], "unknown sampler parameter 'bogus'"),
        (["generate", "--model", "{model}", "--set", "steps", "hi"], "expected KEY=VALUE"),
        (["frobnicate"], "No such command 'frobnicate'"),
        (["generate", "--model", "{model}", *FAST, LONG_PROMPT], "the model's context is 256"),
        (["info", "{model}", "--context", "100000"], "beyond the model's context of 256"),
        (["generate", "--model", "{model}", "   "], "empty prompt"),
    ],
    ids=[
        "missing-dir",
        "broken-config",
        "truncated-weights",
        "info-missing",
        "steps-0",
        "max-tokens-negative",
        "t-min-above-t-max",
        "unknown-parameter",
        "malformed-set",
        "unknown-command",
        "prompt-beyond-context",
        "context-beyond-model",
        "empty-prompt",
    ],
)
def test_bad_input_is_one_line(args, fragment, model_dir, broken_dirs, capsys):
    values = {"model": str(model_dir), **{name: str(path) for name, path in broken_dirs.items()}}
    code, out, err = run_main(capsys, *(arg.format(**values) if arg.startswith("{") else arg for arg in args))
    assert_one_line_error(code, err, fragment)
    assert out == ""


def test_debug_shows_the_traceback(broken_dirs, capsys):
    code, _, err = run_main(capsys, "--debug", "generate", "--model", str(broken_dirs["missing"]), "hi")
    assert code == 1
    assert "Traceback" in err and "LoadError" in err
    assert err.strip().splitlines()[-1].startswith("error: no model directory at")


def test_default_model_offline_names_the_way_out(env, tmp_path):
    """Without --model the hub model is used; offline and not cached, one line says what to do."""
    env = {**env, "HF_HOME": str(tmp_path / "hf")}
    result = subprocess.run(dgemma("generate", "hi"), capture_output=True, env=env)
    err = result.stderr.decode()
    assert result.returncode == 1
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert cli.DEFAULT_MODEL in err and "pass a local checkpoint directory" in err and "HF_HUB_OFFLINE" in err


# ---------------------------------------------------------------- help


@pytest.mark.parametrize(
    ("command", "options"),
    [
        ([], ["chat", "generate", "info", "convert", "--debug"]),
        (["chat"], ["--model", "--system", "--max-tokens", "--steps", "--seed", "--thinking", "--no-draft", "--set"]),
        (["generate"], ["PROMPT", "--model", "--system", "--max-tokens", "--steps", "--json", "--stats", "stdin"]),
        (["info"], ["MODEL", "--context", "--json", "parameters"]),
        (["convert"], ["SRC", "DST", "--bits", "--dtype"]),
    ],
)
def test_help(command, options, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "160")
    code, out, _ = run_main(capsys, *command, "--help")
    assert code == 0
    for option in options:
        assert option in out, option


# ---------------------------------------------------------------- units


def test_parse_assignments():
    assert common.parse_assignments(["steps=8", "T-MIN=0.25", "max_tokens=5", "entropy_bound=1"]) == {
        "steps": 8,
        "t_min": 0.25,
        "max_new_tokens": 5,
        "entropy_bound": 1.0,
    }
    for bad, message in [
        ("seed=1.5", "integer"),
        ("t_max=hot", "number"),
        ("=3", "KEY=VALUE"),
        ("pad=1", "unknown"),
        ("seed=-1", ">= 0"),
    ]:
        with pytest.raises(ValueError, match=message):
            common.parse_assignments([bad])


def render(stream: str, width: int) -> list[str]:
    """The screen a terminal shows after `stream`: wrapping, \\r, \\n, cursor up (A), column (G), erase below (J)."""
    rows: list[list[str]] = [[]]
    row = col = 0
    index = 0
    while index < len(stream):
        char = stream[index]
        if char == "\x1b":
            match = re.match(r"\x1b\[([0-9;?]*)([A-Za-z])", stream[index:])
            assert match, stream[index : index + 10]
            number = int(match.group(1)) if match.group(1).isdigit() else 1
            if match.group(2) == "A":
                row, col = max(0, row - number), min(col, width - 1)
            elif match.group(2) == "G":
                col = min(number - 1, width - 1)
            elif match.group(2) == "J":
                del rows[row][col:]
                del rows[row + 1 :]
            index += match.end()
            continue
        if char == "\r":
            col = 0
        elif char == "\n":
            row, col = row + 1, 0
        else:
            if col >= width:  # pending wrap
                row, col = row + 1, 0
            while len(rows) <= row:
                rows.append([])
            line = rows[row]
            line.extend(" " * (col + 1 - len(line)))
            line[col] = char
            col += 1
        while len(rows) <= row:
            rows.append([])
        index += 1
    return ["".join(line).rstrip() for line in rows]


@pytest.mark.parametrize("width", [12, 20, 80])
def test_drafts_are_redrawn_in_place_and_leave_only_the_committed_text(width, monkeypatch):
    monkeypatch.setattr(views.shutil, "get_terminal_size", lambda *a: os.terminal_size((width, 8)))
    out = io.StringIO()
    view = views.LiveReply(out)
    view.start()
    commits = ["Once upon a time, ", "x" * (width - len("Once upon a time, ") % width), "there was\na canvas.\n", "End"]
    drafts = ["short", "a draft much longer than one row of this terminal " * 3, "two\nlines", "\x1b[31mred?", ""]
    for commit in commits:
        for draft in drafts:
            view.last_draft = float("-inf")  # no frame-rate limit here
            view.draft(draft)
        view.commit(commit, "")
    view.finish()
    assert "\x1b[31m" not in out.getvalue()  # the model's text cannot drive the terminal
    expected = render("".join(commits) + "\n", width)
    assert render(out.getvalue(), width) == expected


def test_thinking_is_dimmed_before_the_answer():
    out = io.StringIO()
    view = views.PlainReply(out, style=True)
    view.commit("", "Let me think.")
    view.commit("Answer", "")
    view.finish()
    assert out.getvalue() == f"{views.DIM}Let me think.{views.UNDIM}\n\nAnswer\n"
    plain = io.StringIO()
    view = views.PlainReply(plain, style=False)
    view.commit("Yes", "Hmm. ")
    view.finish()
    assert plain.getvalue() == "Hmm. \n\nYes\n"


# ---------------------------------------------------------------- infill and edit on files


SOURCE = "def add(a, b):\n    return a + b\n\n\nprint(add(1, 2))\n"


def test_infill_prints_the_file_with_the_hole_filled(model_dir, tmp_path, capsys):
    path = tmp_path / "code.py"
    path.write_text(SOURCE)
    code, out, _ = run_main(
        capsys, "infill", str(path), "--at", "4", "--tokens", "6", "-m", str(model_dir), "--steps", "3"
    )
    assert code == 0
    line_four = SOURCE.index("\n\n") + 2  # lines 3 and 4 are empty; the hole opens where line 4 starts
    head, tail = SOURCE[:line_four], SOURCE[line_four:]
    assert out.startswith(head) and out.endswith(tail) and len(out) >= len(SOURCE)
    assert path.read_text() == SOURCE  # printed, not written


def test_infill_at_a_column_in_place_keeps_a_backup(model_dir, tmp_path, capsys):
    path = tmp_path / "code.py"
    path.write_text(SOURCE)
    args = ["infill", str(path), "--at", "2:13", "--tokens", "4", "-m", str(model_dir), "--steps", "3", "--in-place"]
    code, out, _ = run_main(capsys, *args)
    assert code == 0 and out == ""
    new = path.read_text()
    assert new.startswith("def add(a, b):\n    return a") and new.endswith(" + b\n\n\nprint(add(1, 2))\n")
    assert (tmp_path / "code.py.bak").read_text() == SOURCE
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_edit_rewrites_only_the_given_lines(model_dir, tmp_path, capsys):
    path = tmp_path / "code.py"
    path.write_text(SOURCE)
    args = ["edit", str(path), "--lines", "2-2", "--instruction", "subtract instead", "-m", str(model_dir)]
    code, out, _ = run_main(capsys, *args, "--steps", "3")
    assert code == 0
    assert out.startswith("def add(a, b):\n") and out.endswith("\n\n\nprint(add(1, 2))\n")


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["infill", "{file}", "--at", "99"], "outside the file"),
        (["infill", "{file}", "--at", "2:80"], "outside line 2"),
        (["infill", "{file}", "--at", "x"], "LINE or LINE:COL"),
        (["infill", "{missing}", "--at", "1"], "no file at"),
        (["edit", "{file}", "--lines", "3-1"], "bad line range"),
        (["edit", "{file}", "--lines", "1-99"], "outside the file"),
        (["edit", "{file}", "--lines", "a-b"], "A-B"),
    ],
)
def test_bad_positions_and_spans(args, fragment, model_dir, tmp_path, capsys):
    path = tmp_path / "code.py"
    path.write_text(SOURCE)
    filled = [a.format(file=path, missing=tmp_path / "nope.py") for a in args]
    code, _, err = run_main(capsys, *filled, "-m", str(model_dir))
    assert_one_line_error(code, err, fragment)
    assert path.read_text() == SOURCE


# ---------------------------------------------------------------- prompts that are not UTF-8


def test_a_prompt_that_is_not_utf8_is_one_line(model_dir, env):
    """As an argument or on stdin: one error line and exit 1, not the tokenizer's traceback."""
    as_argument = subprocess.run(
        [*dgemma("generate", "--model", str(model_dir), *FAST), b"caf\xe9"], capture_output=True, env=env
    )
    on_stdin = subprocess.run(
        dgemma("generate", "--model", str(model_dir), *FAST), input=b"caf\xe9\n", capture_output=True, env=env
    )
    for result in (as_argument, on_stdin):
        assert result.stdout == b""
        assert_one_line_error(result.returncode, result.stderr.decode(), "the prompt is not valid UTF-8 (byte 0xe9")


def test_a_prompt_that_is_not_utf8_on_a_strict_stdin(model_dir, capsys, monkeypatch):
    """A stdin that decodes strictly (no surrogateescape) gives the same one line."""
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"caf\xe9\n"), encoding="utf-8", errors="strict"))
    code, out, err = run_main(capsys, "generate", "--model", str(model_dir), *FAST)
    assert_one_line_error(code, err, "the prompt is not valid UTF-8")
    assert out == ""


def test_chat_refuses_a_line_that_is_not_utf8_and_goes_on(model_dir, env):
    """Piped (or typed where line editing passes bytes through): an error line per bad line, then the next turn.

    GNU readline on a UTF-8 terminal drops undecodable bytes itself, so a terminal shows no such line.
    """
    script = b"caf\xe9 au lait\n/system \xff\nhello there\n/history\n/quit\n"
    result = subprocess.run(
        dgemma("chat", "--model", str(model_dir), *FAST), input=script, capture_output=True, env=env
    )
    out, err = result.stdout.decode(), result.stderr.decode()
    assert result.returncode == 0, err
    errors = err.strip().splitlines()
    assert len(errors) == 2 and all(line.startswith("error: the line is not valid UTF-8") for line in errors), err
    assert len(re.findall(STATS, out)) == 1  # the valid line got its reply
    assert "user: hello there" in out and "user: caf" not in out and "system:" not in out


# ---------------------------------------------------------------- /stats after an interrupted reply


class _FakeChat:
    """Replies from a script: a Done result, or a KeyboardInterrupt part-way (as Ctrl-C raises it)."""

    def __init__(self, script):
        self.script = list(script)
        self.messages = []

    def stream(self, text, drafts=False):
        from mlx_dgemma.generate import Commit, Done, GenerationResult, GenerationStats

        outcome = self.script.pop(0)
        yield Commit(text="partial ", thinking="", tokens=[1, 2])
        if outcome == "interrupt":
            raise KeyboardInterrupt
        yield Done(GenerationResult("partial ", "", [1, 2], "stop", GenerationStats(generation_tokens=2)))


def test_stats_after_an_interrupted_reply_are_not_the_previous_replys():
    from mlx_dgemma.cli.chat import ChatRepl

    out = io.StringIO()
    repl = ChatRepl(_FakeChat(["done", "interrupt"]), out, live=False, interactive=False)
    repl.command("/stats")
    assert "no reply yet" in out.getvalue()
    repl.reply("first")
    repl.command("/stats")
    assert "last reply   2 tokens, finish_reason stop" in out.getvalue()
    out.truncate(0)
    repl.reply("second")
    assert "reply interrupted" in out.getvalue()
    repl.command("/stats")
    shown = out.getvalue()
    assert "the last reply was interrupted: no statistics" in shown and "finish_reason" not in shown


# ---------------------------------------------------------------- broken weight files


def _with_weights(model_dir: Path, root: Path, data: bytes) -> Path:
    """A copy of the checkpoint whose model.safetensors holds `data`."""
    root.mkdir()
    for file in model_dir.iterdir():
        (root / file.name).write_bytes(data if file.name == "model.safetensors" else file.read_bytes())
    return root


def _header(entries: dict) -> bytes:
    raw = json.dumps(entries).encode()
    return struct.pack("<Q", len(raw)) + raw


@pytest.mark.parametrize(
    ("weights", "fragment"),
    [
        (lambda good: os.urandom(len(good) // 4), "not a safetensors file"),
        (lambda good: good[: len(good) // 2], "cut short"),
        (lambda good: good[:5], "too short for a safetensors file"),
        (lambda good: struct.pack("<Q", 12) + b"{not json!!}" + b"\0" * 64, "header is not a JSON object"),
        (lambda good: _header({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 12]}}) + b"\0" * 16, "w's"),
        (lambda good: _header({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}) + b"\0" * 8, "cut short"),
        (lambda good: _header({"w": {"shape": [4]}}), "malformed header entry for tensor w"),
    ],
    ids=["random-bytes", "truncated", "shorter-than-8-bytes", "not-json", "offsets-vs-shape", "data-cut", "malformed"],
)
def test_info_refuses_broken_weights(weights, fragment, model_dir, tmp_path, capsys):
    """No "fits" for a file that is not a whole safetensors file: one line, exit 1 (and so for generate)."""
    broken = _with_weights(model_dir, tmp_path / "broken", weights((model_dir / "model.safetensors").read_bytes()))
    code, out, err = run_main(capsys, "info", str(broken))
    assert_one_line_error(code, err, fragment)
    assert "model.safetensors" in err and out == ""
    code, out, err = run_main(capsys, "generate", "--model", str(broken), *FAST, "hi")
    assert_one_line_error(code, err, fragment)


def test_info_refuses_a_checkpoint_without_weights(model_dir, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_bytes((model_dir / "config.json").read_bytes())
    code, _, err = run_main(capsys, "info", str(empty))
    assert_one_line_error(code, err, "no *.safetensors weights in")


def test_the_header_check_reads_what_safetensors_reads(model_dir, quantized_dir):
    from safetensors import safe_open

    for path in (model_dir, quantized_dir):
        for file in memory.check_weights(path):
            header = memory.read_safetensors_header(file)
            with safe_open(str(file), "np") as handle:
                assert set(header) == set(handle.keys())
                assert all(list(handle.get_slice(name).get_shape()) == header[name]["shape"] for name in header)


# ---------------------------------------------------------------- a mistyped local path


@pytest.mark.parametrize("command", [["info"], ["convert"], ["generate", "hi", "--model"]])
def test_a_mistyped_path_is_named_as_such(command, env, tmp_path):
    """`ck/q4x` reads as a repo id; the error says there is no such directory, with a hint every command can take."""
    env = {**env, "HF_HOME": str(tmp_path / "hf")}
    args = [*command, "ck/q4x"] + ([str(tmp_path / "out")] if command == ["convert"] else [])
    result = subprocess.run(dgemma(*args), capture_output=True, env=env, cwd=tmp_path)
    err = result.stderr.decode()
    assert_one_line_error(result.returncode, err, "there is no local directory ck/q4x")
    assert "pass a local checkpoint directory" in err and "--model" not in err and "Error" not in err


def test_an_unreachable_hub_is_named_without_the_exception_class(monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    from mlx_dgemma.loader import LoadError, resolve_model_path

    def unreachable(*args, **kwargs):
        raise LocalEntryNotFoundError("An error happened while trying to locate the files on the Hub ...")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", unreachable)
    with pytest.raises(LoadError) as raised:
        resolve_model_path("ck/q4x")
    message = str(raised.value)
    assert "there is no local directory ck/q4x" in message and "the hub cannot be reached" in message
    assert "LocalEntryNotFoundError" not in message and "--model" not in message


# ---------------------------------------------------------------- a failed --in-place write


@pytest.mark.parametrize("failure", ["mkstemp refused"])
def test_a_failed_in_place_write_keeps_the_result(failure, model_dir, tmp_path, capsys, monkeypatch):
    """The generated text goes to stdout, the error names the file (not the temporary one), FILE is unchanged."""
    import mlx_dgemma.files as files

    folder = tmp_path / "src"
    folder.mkdir()
    path = folder / "code.py"
    path.write_text(SOURCE)
    if failure == "mkstemp refused":  # what mkstemp raises in a read-only directory, for root too (CI runs as root)

        def refused(prefix, suffix, dir):
            raise PermissionError(13, "Permission denied", f"{dir}/{prefix}k2j4h6{suffix}")

        monkeypatch.setattr(files, "tempfile", type("T", (), {"mkstemp": staticmethod(refused)}))
    args = ["infill", str(path), "--at", "4", "--tokens", "6", "-m", str(model_dir), "--steps", "3"]
    try:
        code, out, err = run_main(capsys, *args, "--in-place")
    finally:
        folder.chmod(0o755)
    assert_one_line_error(code, err, f"cannot write {path}: Permission denied")
    assert ".tmp" not in err and "stdout" in err
    assert out == run_main(capsys, *args)[1]  # the result, as without --in-place
    assert path.read_text() == SOURCE and sorted(p.name for p in folder.iterdir()) == ["code.py"]


# ---------------------------------------------------------------- --version and the default model in --help


def test_version(capsys):
    from importlib.metadata import version

    code, out, err = run_main(capsys, "--version")
    assert code == 0 and err == ""
    assert out.strip() == f"dgemma (mlx-dgemma) {version('mlx-dgemma')}"


@pytest.mark.parametrize("command", ["chat", "generate", "info", "infill", "edit"])
def test_help_shows_the_default_model_in_full_at_80_columns(command, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    code, out, _ = run_main(capsys, command, "--help")
    assert code == 0
    assert cli.DEFAULT_MODEL in out
    assert max(len(line) for line in out.splitlines()) <= 80

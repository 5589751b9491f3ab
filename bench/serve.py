"""`dgemma serve` under concurrent clients: aggregate throughput and time to the first committed canvas.

    python -m bench serve                    # quick shape, canvas 64, 1/2/4/8 clients, a few minutes on a CPU
    python -m bench serve --help

A live server (`dgemma serve` in its own process, loopback) on a random-weight
checkpoint with the test tokenizer, run both ways it can share the model: as
it does by default, the running requests taking turns canvas by canvas, and
with `--max-batch N`, denoising them together as one batch (joining and
leaving at canvas boundaries). For each client count N, N clients send their
requests at once (half chat replies of two canvases, half short infills
through /v1/completions with a suffix), all streamed, to each server; then the
same requests are sent one after another. Reported per N: aggregate completion
tokens/s each way, and the median time from a request's send to its first
committed text (each request's in the JSON of `--json`).

Then the head-of-line case, on the default server: a short infill sent while a
long chat reply runs its first canvas, its time to first committed canvas in
canvases of that reply (the time between its commits when it runs alone on the
same server) and against the infill's own time alone.
"""

from __future__ import annotations

import argparse
import json
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

from .build import helper_from_tests
from .shapes import PRESETS

SUFFIX = "\n    return total\n"


def build_checkpoint(shape_name: str, canvas: int, folder: Path) -> Path:
    """A random-weight checkpoint of the preset shape written by the reference, with the test tokenizer."""
    shape = replace(PRESETS[shape_name], canvas_length=canvas)
    checkpoints, tokenizer = helper_from_tests("checkpoints"), helper_from_tests("tokenizer_fixture")
    model = checkpoints.build_reference_model(seed=0, canvas_length=canvas, **shape.text)
    path = checkpoints.save_reference_checkpoint(model, folder / "checkpoint")
    tokenizer.write_tokenizer(path, vocab_size=shape.text["vocab_size"])
    return path


class LiveServer:
    """`dgemma serve` in a process of its own (the clients' threads stay out of its interpreter), on a free
    loopback port."""

    def __init__(self, path: Path, max_concurrent: int, max_batch: int | None = None):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        command = [sys.executable, "-m", "mlx_dgemma.cli", "serve", "--model", str(path), "--port", str(self.port)]
        command += ["--max-concurrent", str(max_concurrent), "--max-queue", "64"]
        if max_batch is not None:
            command += ["--max-batch", str(max_batch)]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.url = f"http://127.0.0.1:{self.port}"
        self._wait_until_up()

    def _wait_until_up(self, seconds: float = 300) -> None:
        import httpx

        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"dgemma serve exited: {self.process.stderr.read().strip()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        raise RuntimeError("dgemma serve did not come up")

    def close(self) -> None:
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()


def timed_request(url: str, kind: str, index: int, steps: int, canvas: int) -> dict[str, float]:
    """One streamed request: its completion tokens, seconds to its first committed text, and in all."""
    import httpx

    body: dict[str, Any] = {"stream": True, "seed": index, "steps": steps, "stream_options": {"include_usage": True}}
    if kind == "chat":
        route = "/v1/chat/completions"
        body |= {"messages": [{"role": "user", "content": f"Tell story number {index}."}], "max_tokens": 2 * canvas}
    else:
        route = "/v1/completions"
        body |= {"prompt": f"def total_{index}(xs):\n    total = ", "suffix": SUFFIX, "max_tokens": canvas // 4}
    start, commits, tokens = time.perf_counter(), [], 0
    with httpx.stream("POST", url + route, json=body, timeout=600) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if any(_committed(choice) for choice in chunk.get("choices", [])):
                commits.append(time.perf_counter() - start)
    total = time.perf_counter() - start
    return {"tokens": tokens, "first": commits[0] if commits else total, "total": total, "commits": commits}


def _committed(choice: dict[str, Any]) -> bool:
    delta = choice.get("delta", choice)
    return bool(delta.get("content") or delta.get("text") or delta.get("reasoning_content"))


def _kinds(clients: int) -> list[str]:
    return ["chat" if i % 2 == 0 else "infill" for i in range(clients)]


def _figures(results: list[dict[str, Any]], seconds: float) -> dict[str, Any]:
    return {
        "tokens_per_s": sum(r["tokens"] for r in results) / seconds,
        "median_first_canvas_s": statistics.median(r["first"] for r in results),
        "first_canvas_s": [r["first"] for r in results],  # each request's, in order (chat, infill, chat, ...)
    }


def at_once(url: str, clients: int, steps: int, canvas: int) -> dict[str, float]:
    """N clients' requests sent at once: aggregate tokens/s and the median time to a first commit."""
    kinds = _kinds(clients)
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(lambda i: timed_request(url, kinds[i], i, steps, canvas), range(clients)))
    return _figures(results, time.perf_counter() - start)


def one_after_another(url: str, clients: int, steps: int, canvas: int) -> dict[str, float]:
    """The same requests sent one after another."""
    kinds = _kinds(clients)
    start = time.perf_counter()
    results = [timed_request(url, kinds[i], i, steps, canvas) for i in range(clients)]
    return _figures(results, time.perf_counter() - start)


def head_of_line(url: str, steps: int, canvas: int, repeats: int) -> dict[str, float]:
    """A short infill behind a long chat reply: its time to first canvas, in canvases of the long reply (the time
    between its commits when it runs alone) and against the infill's own time alone."""
    infill_alone = statistics.median(
        timed_request(url, "infill", 100 + i, steps, canvas)["first"] for i in range(repeats)
    )
    commits = timed_request(url, "chat", 199, steps, 4 * canvas)["commits"]
    canvas_s = statistics.median(later - earlier for earlier, later in zip(commits, commits[1:]))
    behind = []
    for i in range(repeats):
        long_reply = threading.Thread(target=timed_request, args=(url, "chat", 200 + i, steps, 4 * canvas))
        long_reply.start()
        time.sleep(infill_alone)  # while the reply's prompt and first canvas run
        behind.append(timed_request(url, "infill", 300 + i, steps, canvas)["first"])
        long_reply.join()
    median = statistics.median(behind)
    return {
        "canvas_s": canvas_s,
        "infill_alone_s": infill_alone,
        "median_first_canvas_s": median,
        "canvases": median / canvas_s,
        "vs_infill_alone": median / infill_alone,
    }


def table(levels: list[dict[str, Any]], hol: dict[str, float]) -> str:
    lines = [
        "| clients | tokens/s, taking turns | tokens/s, one batch | tokens/s, one at a time | turns ÷ one at a time"
        " | first canvas, median s (turns / batch / alone) |",
        "|---|---|---|---|---|---|",
    ]
    for row in levels:
        turns, batch, alone = row["turns"], row["batch"], row["alone"]
        lines.append(
            f"| {row['clients']} | {turns['tokens_per_s']:.1f} | {batch['tokens_per_s']:.1f}"
            f" | {alone['tokens_per_s']:.1f} | {turns['tokens_per_s'] / alone['tokens_per_s']:.2f}×"
            f" | {turns['median_first_canvas_s']:.2f} / {batch['median_first_canvas_s']:.2f}"
            f" / {alone['median_first_canvas_s']:.2f} |"
        )
    lines.append(
        f"\nA short infill behind a long chat reply: first canvas after {hol['median_first_canvas_s']:.2f} s, "
        f"{hol['canvases']:.1f} canvases of the reply's time (one of its canvases alone: {hol['canvas_s']:.2f} s), "
        f"{hol['vs_infill_alone']:.1f}× the infill's time alone ({hol['infill_alone_s']:.2f} s)."
    )
    return "\n".join(lines)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(PRESETS), default="quick")
    parser.add_argument("--canvas", type=int, default=64, help="canvas length of the checkpoint (default 64)")
    parser.add_argument("--clients", default="1,2,4,8", help="comma-separated client counts")
    parser.add_argument("--steps", type=int, default=8, help="denoising steps per canvas (default 8)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of every measurement, medians kept (default 3)")
    parser.add_argument("--repeats", type=int, default=3, help="head-of-line repeats (default 3)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    counts = [int(n) for n in args.clients.split(",") if n.strip()]
    with tempfile.TemporaryDirectory() as folder:
        path = build_checkpoint(args.shape, args.canvas, Path(folder))
        # Both servers up at once, one of them busy at a time (an idle server takes no CPU): each round measures
        # every way back to back, so a drift in the machine's speed touches them alike.
        # The server's default (taking turns), and every client's request in one batch.
        ways = {"turns": None, "batch": max(counts)}
        servers = {way: LiveServer(path, max(counts), max_batch) for way, max_batch in ways.items()}
        try:
            for server in servers.values():
                for n in counts:  # compile the graphs once, for every batch size
                    at_once(server.url, n, args.steps, args.canvas)
            rounds: list[dict[int, dict[str, dict[str, float]]]] = []
            for _ in range(args.rounds):
                rounds.append({n: _level(servers, n, args.steps, args.canvas) for n in counts})
            hol = head_of_line(servers["turns"].url, args.steps, args.canvas, args.repeats)
        finally:
            for server in servers.values():
                server.close()
    levels = [{"clients": n, **_medians([measured[n] for measured in rounds])} for n in counts]
    command = "python -m bench serve " + " ".join(argv if argv is not None else sys.argv[1:])
    print(f"## dgemma serve, {args.shape} shape, canvas {args.canvas}, {args.steps} steps\n\n`{command.strip()}`\n")
    print(table(levels, hol))
    if args.json:
        args.json.write_text(json.dumps({"levels": levels, "head_of_line": hol, "command": command}, indent=2))
    return 0


def _level(servers: dict[str, LiveServer], clients: int, steps: int, canvas: int) -> dict[str, dict[str, float]]:
    figures = {way: at_once(server.url, clients, steps, canvas) for way, server in servers.items()}
    figures["alone"] = one_after_another(servers["turns"].url, clients, steps, canvas)
    return figures


def _medians(rounds: list[dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Each figure's median over the rounds (each request's, for a figure per request)."""

    def median(values: list[Any]) -> Any:
        if isinstance(values[0], list):
            return [statistics.median(each) for each in zip(*values)]
        return statistics.median(values)

    return {
        way: {name: median([measured[way][name] for measured in rounds]) for name in rounds[0][way]}
        for way in rounds[0]
    }


if __name__ == "__main__":
    raise SystemExit(main())

"""Worker processes, one per runtime, driven phase by phase.

Interleaved (the default): every worker is started at once (their imports
overlap), then the parent sends each phase to one worker at a time, runtime
after runtime: load, fixed-step run 0 for all, run 1 for all, ..., warm
prefills, the adaptive run, finish. Only one worker computes at any moment,
and a slow spell of the machine lands on all runtimes rather than on one.
Sequential: each runtime runs all its phases alone, start to exit, before the
next starts (one process alive at a time: use it where memory is tight).
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from .shapes import RunSpec

REPO = Path(__file__).resolve().parent.parent
HZ = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _machine_busy() -> float | None:
    """Busy CPU seconds of the whole machine since boot (Linux), or None."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, *rest = (int(f) for f in fields)
    steal = rest[0] if rest else 0
    return (user + nice + system + irq + softirq + steal) / HZ


def _process_cpu(pids: list[int]) -> float:
    """CPU seconds used so far by these processes (all their threads), by this one and by its children it has
    waited for (a child that ran to its end within an interval is ours, not foreign load)."""
    total = sum(os.times()[:4])
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / HZ
        except (OSError, IndexError, ValueError):
            pass
    return total


QUIET_WAIT = 300.0  # seconds a measured run waits at most for the CPUs to go idle (a quick run: none)


def add_run_options(parser: argparse.ArgumentParser, unit: str, preload_into: str) -> None:
    """The options of every benchmark that runs its measurements in child processes, each `unit` on its own:
    --rebuild, --no-openblas, --timeout and --quiet-wait (see `quiet_wait`)."""
    parser.add_argument("--rebuild", action="store_true", help="rebuild the checkpoint even if cached")
    parser.add_argument("--no-openblas", action="store_true", help=f"do not preload OpenBLAS into {preload_into}")
    parser.add_argument("--timeout", type=float, default=3600, help=f"seconds allowed per {unit} (default 3600)")
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=None,
        help=f"before each {unit}, wait up to this many seconds for other processes to leave the CPUs idle "
        f"(default {QUIET_WAIT:g}; quick: 0). Their load during each {unit} is recorded either way",
    )


def quiet_wait(given: float | None, quick: bool) -> float:
    """--quiet-wait's value: as given, else none for a quick run and QUIET_WAIT otherwise."""
    if given is not None:
        return given
    return 0.0 if quick else QUIET_WAIT


class LoadMeter:
    """How many cores other processes kept busy over an interval: our runs measure badly when that is high."""

    def __init__(self, pids: list[int]):
        self.pids = pids
        self.start()

    def start(self) -> None:
        self.wall, self.busy, self.ours = time.perf_counter(), _machine_busy(), _process_cpu(self.pids)

    def foreign_cores(self) -> float | None:
        busy = _machine_busy()
        if busy is None or self.busy is None:
            return None
        wall = time.perf_counter() - self.wall
        foreign = (busy - self.busy) - (_process_cpu(self.pids) - self.ours)
        return max(0.0, foreign / wall) if wall > 0 else None


def wait_until_quiet(pids: list[int], max_wait: float, threshold: float = 0.25) -> tuple[float, float | None]:
    """Wait (up to max_wait s) until other processes use under `threshold` cores over a 2 s window; the seconds
    waited and the last load seen (max_wait <= 0: no wait, no load)."""
    if max_wait <= 0:
        return 0.0, None
    start = time.perf_counter()
    load = None
    while True:
        meter = LoadMeter(pids)
        time.sleep(2.0)
        load = meter.foreign_cores()
        if load is None or load < threshold or time.perf_counter() - start >= max_wait:
            return time.perf_counter() - start, load


class WorkerProcess:
    def __init__(self, spec: RunSpec, logs: Path, env: dict[str, str]):
        self.name = spec.runtime
        stem = f"{spec.shape.name}-{self.name}"
        self.spec_path, self.result_path = logs / f"{stem}.spec.json", logs / f"{stem}.result.json"
        self.log_path = logs / f"{stem}.log"
        self.spec_path.write_text(json.dumps(spec.to_json(), indent=2))
        self.result_path.unlink(missing_ok=True)
        self.failure: str | None = None
        self.done = False
        self.phase_log: list[dict[str, Any]] = []
        self.started = time.perf_counter()
        self.replies: queue.Queue = queue.Queue()
        command = [sys.executable, "-m", "bench.worker", str(self.spec_path), str(self.result_path), "--serve"]
        self.proc = subprocess.Popen(
            command,
            cwd=REPO,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        self.log = open(self.log_path, "w")  # noqa: SIM115 - closed in close()
        threading.Thread(target=self._relay, daemon=True).start()
        threading.Thread(target=self._read, daemon=True).start()

    def _relay(self) -> None:
        for line in self.proc.stderr:
            sys.stderr.write(line)
            self.log.write(line)
            self.log.flush()

    def _read(self) -> None:
        for line in self.proc.stdout:
            try:
                self.replies.put(json.loads(line))
            except json.JSONDecodeError:
                continue
        self.replies.put(None)  # the process closed its stdout: it exited

    @property
    def alive(self) -> bool:
        return self.failure is None and not self.done

    def wait(self, timeout: float, what: str) -> bool:
        """The reply to the last command; on timeout the worker is killed and marked failed."""
        try:
            reply = self.replies.get(timeout=timeout)
        except queue.Empty:
            self.kill()
            self.failure = f"{what}: timed out after {timeout:.0f} s (figures measured before are kept)"
            return False
        if reply is None:
            code = self.proc.wait()
            why = "killed (out of memory?)" if code in (-9, 137) else f"exited with code {code}"
            self.failure = f"{what}: worker {why}; see {self.log_path}"
            return False
        if reply.get("skipped"):
            self.done = True
            return False
        if not reply.get("ok"):
            self.failure = f"{what}: {reply.get('error')}"
            return False
        return True

    def send(self, command: str, timeout: float, others: list[int] = (), quiet_wait: float = 0.0) -> bool:
        """Run one phase; `others` are our other workers' pids (idle, but not foreign load)."""
        if not self.alive:
            return False
        pids = [self.proc.pid, *others]
        entry: dict[str, Any] = {"command": command}
        if quiet_wait > 0:
            waited, load = wait_until_quiet(pids, quiet_wait)
            entry.update(waited_for_quiet_s=round(waited, 1), load_before=load)
            if load is not None and load >= 0.25:
                print(f"[bench] {self.name} {command}: other processes still use {load:.2f} cores", file=sys.stderr)
        meter = LoadMeter(pids)
        try:
            self.proc.stdin.write(command + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            self.failure = f"{command}: the worker is gone; see {self.log_path}"
            return False
        ok = self.wait(timeout, command)
        entry.update(wall_s=round(time.perf_counter() - meter.wall, 3), foreign_cores=meter.foreign_cores())
        self.phase_log.append(entry)
        return ok

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def close(self) -> dict[str, Any]:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write("quit\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=60)
            except (BrokenPipeError, OSError, subprocess.TimeoutExpired):
                self.kill()
                self.proc.wait()
        time.sleep(0.1)  # let the relay thread drain
        self.log.close()
        try:
            result = json.loads(self.result_path.read_text())
        except (OSError, json.JSONDecodeError):
            result = {"runtime": self.name, "metrics": {}, "phase_errors": {}, "env": {}, "status": "error"}
        if self.failure:
            result["status"], result["error"] = "error", self.failure
        elif result.get("status") in (None, "running"):
            result["status"], result["error"] = "error", f"the worker stopped early; see {self.log_path}"
        result["wall_s"] = time.perf_counter() - self.started
        result["log"] = str(self.log_path)
        result["phase_log"] = self.phase_log
        loads = [e["foreign_cores"] for e in self.phase_log if e.get("foreign_cores") is not None]
        result.setdefault("metrics", {})["foreign_cores_max"] = max(loads) if loads else None
        return result


def phases(settings) -> list[str]:
    commands = ["load", *(f"fixed {i}" for i in range(settings.repeats)), "prefill"]
    if settings.adaptive:
        commands.append("adaptive")
    return [*commands, "finish"]


def run_all(
    specs: list[RunSpec], logs: Path, env_for, timeout: float, interleave: bool = True, quiet_wait: float = 0.0
) -> dict[str, dict[str, Any]]:
    """Run the runtimes' phases; returns each runtime's result."""
    if not specs:
        return {}
    commands = phases(specs[0].settings)
    results: dict[str, dict[str, Any]] = {}
    workers: list[WorkerProcess] = []
    try:
        if interleave:
            workers = [WorkerProcess(spec, logs, env_for(spec.runtime)) for spec in specs]
            for worker in workers:
                worker.wait(timeout, "import")
            for command in commands:
                for worker in workers:
                    others = [w.proc.pid for w in workers if w is not worker]
                    worker.send(command, timeout, others, quiet_wait)
            for worker in workers:
                results[worker.name] = worker.close()
            return results
        for spec in specs:
            worker = WorkerProcess(spec, logs, env_for(spec.runtime))
            workers.append(worker)
            if worker.wait(timeout, "import"):
                for command in commands:
                    if not worker.send(command, timeout, (), quiet_wait):
                        break
            results[worker.name] = worker.close()
        return results
    finally:
        for worker in workers:  # interrupted (Ctrl-C): no worker outlives the run
            if worker.proc.poll() is None:
                worker.kill()

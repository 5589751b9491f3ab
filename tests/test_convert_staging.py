"""The converter's staging directories: killed and interrupted runs, concurrent runs, output modes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from checkpoints import build_reference_model, save_reference_checkpoint

from mlx_dgemma.convert import ConversionError, convert_checkpoint

# Small shards on both sides, so that a run stopped halfway has written some.
SHARD_BYTES = 10_000


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    return save_reference_checkpoint(
        build_reference_model(), tmp_path_factory.mktemp("src") / "ckpt", max_shard_size="100KB"
    )


def convert(src: Path, dst: Path, **options) -> Path:
    return convert_checkpoint(src, dst, recipe="none", dtype="float32", max_shard_bytes=SHARD_BYTES, **options)


def staging_dirs(directory: Path) -> set[str]:
    return {p.name for p in directory.iterdir() if ".tmp-" in p.name}


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


def assert_complete(dst: Path) -> None:
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and all((dst / shard).is_file() for shard in shards)
    assert sorted(p.name for p in dst.glob("*.safetensors")) == sorted(shards)
    assert (dst / "config.json").is_file()


# ---------------------------------------------------------------- runs in child processes

# Converts argv[1] into argv[2]; halfway through, it writes argv[3] and waits to be killed or interrupted.
STALLING_CONVERT = textwrap.dedent(
    f"""
    import signal, sys, time
    from pathlib import Path
    from mlx_dgemma.convert import convert_checkpoint

    # Ctrl-C raises KeyboardInterrupt even where the shell started us with SIGINT ignored (background jobs).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    src, dst, marker = sys.argv[1:]

    def stall(done, total, name):
        if done == total // 2:
            Path(marker).write_text("halfway")
            time.sleep(120)

    convert_checkpoint(src, dst, recipe="none", dtype="float32", max_shard_bytes={SHARD_BYTES}, progress=stall)
    """
)

# Converts argv[1] into the existing argv[2] with force and kills itself between publishing's two renames:
# the old checkpoint has been moved aside, the new one not yet moved in.
KILLED_WHILE_PUBLISHING = textwrap.dedent(
    """
    import os, pathlib, signal, sys
    from mlx_dgemma.convert import convert_checkpoint

    src, dst = sys.argv[1:]
    rename = pathlib.Path.rename

    def rename_then_die(self, target):
        if pathlib.Path(target) == pathlib.Path(dst) and ".tmp-" in self.name:
            os.kill(os.getpid(), signal.SIGKILL)
        return rename(self, target)

    pathlib.Path.rename = rename_then_die
    convert_checkpoint(src, dst, recipe="none", dtype="float32", force=True)
    """
)


def start_stalled_convert(src: Path, dst: Path, marker: Path) -> tuple[subprocess.Popen, str]:
    """A child convert stopped halfway, and the staging directory it is writing."""
    before = staging_dirs(dst.parent) if dst.parent.exists() else set()
    child = subprocess.Popen(
        [sys.executable, "-c", STALLING_CONVERT, str(src), str(dst), str(marker)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not marker.exists():
            if child.poll() is not None or time.monotonic() > deadline:
                child.kill()
                pytest.fail(f"the child convert never got halfway: {child.communicate()[1]}")
            time.sleep(0.05)
        (staging,) = staging_dirs(dst.parent) - before
        assert list((dst.parent / staging).glob("*.safetensors")), "halfway, some shards are written"
    except BaseException:
        child.kill()  # a failed test leaves no process sleeping behind it
        child.communicate()
        raise
    return child, staging


def test_a_killed_convert_is_cleaned_up_by_the_next_without_touching_a_running_one(source, tmp_path):
    dst = tmp_path / "out"
    killed, killed_staging = start_stalled_convert(source, dst, tmp_path / "killed-halfway")
    killed.kill()  # SIGKILL: no cleanup of its own
    killed.communicate(timeout=30)  # reaped, as a shell reaps it: a zombie still counts as running
    assert staging_dirs(tmp_path) == {killed_staging}

    running, running_staging = start_stalled_convert(source, dst, tmp_path / "running-halfway")
    try:
        convert(source, dst)
        assert_complete(dst)
        assert staging_dirs(tmp_path) == {running_staging}, "the dead run's staging goes, the running one's stays"
        assert list((tmp_path / running_staging).glob("*.safetensors"))

        running.send_signal(signal.SIGINT)  # Ctrl-C: the run removes its own staging
        _, stderr = running.communicate(timeout=30)
        assert "KeyboardInterrupt" in stderr
    finally:
        if running.poll() is None:
            running.kill()
            running.communicate()
    assert leftovers(tmp_path) == []
    assert_complete(dst)


def test_a_convert_killed_while_publishing_gets_its_old_checkpoint_back(source, tmp_path):
    dst = convert(source, tmp_path / "out")
    (dst / "old-marker").write_text("old")
    done = subprocess.run(
        [sys.executable, "-c", KILLED_WHILE_PUBLISHING, str(source), str(dst)], capture_output=True, timeout=120
    )
    assert done.returncode == -signal.SIGKILL, done.stderr
    assert not dst.exists() and leftovers(tmp_path), "killed between the renames"

    # Without --force the next run must not replace the old checkpoint it puts back.
    with pytest.raises(ConversionError, match="exists; pass --force"):
        convert(source, dst)
    assert (dst / "old-marker").read_text() == "old"
    assert_complete(dst)
    assert leftovers(tmp_path) == []


# ---------------------------------------------------------------- runs interrupted in this process


def interrupt_halfway(done: int, total: int, name: str) -> None:
    if done == total // 2:
        raise KeyboardInterrupt


@pytest.mark.parametrize("force", [False, True])
def test_an_interrupted_convert_removes_its_staging(source, tmp_path, force):
    dst = tmp_path / "out"
    if force:
        dst.mkdir()
        (dst / "old-file").write_text("old")
    with pytest.raises(KeyboardInterrupt):
        convert(source, dst, force=force, progress=interrupt_halfway)
    assert leftovers(tmp_path) == []
    if force:
        assert sorted(p.name for p in dst.iterdir()) == ["old-file"]
    else:
        assert not dst.exists()


def test_an_interrupt_while_publishing_keeps_the_old_checkpoint_and_leaves_nothing(source, tmp_path, monkeypatch):
    dst = convert(source, tmp_path / "out")
    (dst / "old-marker").write_text("old")
    rename = Path.rename

    def interrupted_rename(self, target):
        if Path(target) == dst and ".tmp-" in self.name:
            raise KeyboardInterrupt
        return rename(self, target)

    monkeypatch.setattr(Path, "rename", interrupted_rename)
    with pytest.raises(KeyboardInterrupt):
        convert(source, dst, force=True)
    assert (dst / "old-marker").read_text() == "old"
    assert leftovers(tmp_path) == []


def test_staging_left_by_an_interrupted_cleanup_goes_with_the_next_run_in_the_same_process(
    source, tmp_path, monkeypatch
):
    """A second Ctrl-C can stop the cleanup itself; this process is still alive (a notebook), yet the
    staging is stale once its run has ended."""
    dst = tmp_path / "out"
    rmtree = shutil.rmtree

    def interrupted_rmtree(path, *args, **kwargs):
        if ".tmp-" in Path(path).name:
            raise KeyboardInterrupt
        return rmtree(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", interrupted_rmtree)
    with pytest.raises(KeyboardInterrupt):
        convert(source, dst, progress=interrupt_halfway)
    monkeypatch.undo()
    assert len(staging_dirs(tmp_path)) == 1

    convert(source, dst)
    assert_complete(dst)
    assert leftovers(tmp_path) == []


# ---------------------------------------------------------------- modes


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o027])
@pytest.mark.parametrize("force", [False, True])
def test_output_gets_the_modes_mkdir_and_open_give(source, tmp_path, umask, force):
    dst = tmp_path / "out"
    if force:
        dst.mkdir()
    previous = os.umask(umask)
    try:
        convert(source, dst, force=force)
    finally:
        os.umask(previous)
    assert oct(dst.stat().st_mode & 0o777) == oct(0o777 & ~umask)  # a setgid parent may add 0o2000
    files = list(dst.iterdir())
    assert len(files) > 3
    for path in files:
        assert path.is_file()
        assert oct(path.stat().st_mode & 0o7777) == oct(0o666 & ~umask), path.name

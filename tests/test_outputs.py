"""What ``sample`` and ``evaluate`` leave on disk: ``samples.npz`` and ``samples.png`` are replaced as one unit or
not at all (a full disk keeps the old pair), an unwritable output folder fails before any image is made, records
are never left half written, and Ctrl-C during ``sample`` exits 130 with one line and writes nothing."""

from __future__ import annotations

import contextlib
import errno
import os
import select
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lightning_diff import checkpoint_io
from lightning_diff.cli.evaluate import evaluate
from lightning_diff.cli.sample import sample
from lightning_diff.evaluation.records import write_record

from .helpers import compose_config

pytestmark = pytest.mark.usefixtures("one_thread")

OLD = {"samples.npz": b"old npz", "samples.png": b"old png"}  # an earlier run's pair


def _sample_config(ckpt, out, *extra):
    return compose_config("sample", [f"ckpt={ckpt}", f"out={out}", "num_samples=2", "sampler.steps=2", "device=cpu",
                                     *extra])


def _disk_full(*args, **kwargs):
    """A writer that gets 100 bytes onto the disk, then finds it full (as ``np.savez`` or ``save_image_grid``)."""
    target = next(a for a in args if isinstance(a, (str, os.PathLike)) or hasattr(a, "write"))
    with contextlib.ExitStack() as stack:
        file = target if hasattr(target, "write") else stack.enter_context(open(target, "wb"))
        file.write(b"\0" * 100)
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@contextlib.contextmanager
def _tmpfs(folder: Path, size: str):
    """A tmpfs of ``size`` mounted on ``folder``; skips the test where mounting is not permitted (not root)."""
    folder.mkdir(parents=True, exist_ok=True)
    mount = shutil.which("mount")
    if mount is None or subprocess.run([mount, "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                                       capture_output=True).returncode:
        pytest.skip("mounting a tmpfs is not permitted here")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


@pytest.fixture
def read_only_copy(tmp_path):
    """``copy(file) -> path``: ``file`` copied into a folder this process cannot write (mode 555 for a user; a
    tmpfs remounted read-only for root, whom modes do not stop; skips where neither is possible)."""
    folder = tmp_path / "read_only"
    with contextlib.ExitStack() as stack:
        def copy(file) -> Path:
            if os.geteuid() != 0:
                folder.mkdir()
                shutil.copy(file, folder)
                folder.chmod(0o555)
                stack.callback(folder.chmod, 0o755)
            else:
                stack.enter_context(_tmpfs(folder, "16m"))
                shutil.copy(file, folder)
                if subprocess.run(["mount", "-o", "remount,ro", str(folder)], capture_output=True).returncode:
                    pytest.skip("remounting a tmpfs read-only is not permitted here")
            return folder / Path(file).name

        yield copy


# --- item 8: atomic outputs --------------------------------------------------------------------------------


@pytest.mark.parametrize("failing", ["npz", "png"])
def test_full_disk_keeps_the_old_pair_and_leaves_no_half_new_one(digits_ckpt, tmp_path, monkeypatch, failing):
    """The disk fills while one of the two files is written: both old files keep their bytes and no new or temporary
    file is left. (Before: the png or npz was written in place, leaving it torn beside the other.)"""
    out = tmp_path / "out"
    out.mkdir()
    for name, content in OLD.items():
        (out / name).write_bytes(content)
    if failing == "npz":
        monkeypatch.setattr(np, "savez", _disk_full)
    else:
        monkeypatch.setattr("lightning_diff.callbacks.sample_grid.save_image_grid", _disk_full)
    with pytest.raises(OSError, match=rf"samples\.{failing}") as error:
        sample(_sample_config(digits_ckpt, out))
    assert error.value.errno == errno.ENOSPC
    assert {p.name: p.read_bytes() for p in out.iterdir()} == OLD


def test_pair_on_a_real_full_disk(tmp_path):
    """On a 64 KiB tmpfs, a pair of 40 KiB files does not fit: the old pair stays, no temporary file is left."""
    with _tmpfs(tmp_path / "disk", "64k") as disk:
        for name, content in OLD.items():
            (disk / name).write_bytes(content)
        big = {disk / name: (lambda file: file.write(b"\1" * 40 * 1024)) for name in OLD}
        with pytest.raises(OSError, match=r"No space left on device") as error:
            checkpoint_io.atomic_write_all(big)
        assert error.value.errno == errno.ENOSPC
        assert {p.name: p.read_bytes() for p in disk.iterdir()} == OLD
        (disk / "samples.png").unlink()
        checkpoint_io.atomic_write_all({disk / name: (lambda file: file.write(b"\1" * 20 * 1024)) for name in OLD})
        assert sorted(p.name for p in disk.iterdir()) == sorted(OLD)


def test_record_on_a_real_full_disk_leaves_no_partial_file(tmp_path):
    """An ``eval-*.json`` that does not fit fails naming it, and leaves neither a torn record nor a temporary file."""
    with _tmpfs(tmp_path / "disk", "64k") as disk:
        record = {"provenance": {"config_hash": "abc"}, "padding": "x" * 80 * 1024}
        with pytest.raises(OSError, match=r"eval-abc\.json.*No space left on device"):
            write_record(disk, record)
        assert list(disk.iterdir()) == []


# --- item 9: the output folder is checked before any work --------------------------------------------------


def _never(*args, **kwargs):
    raise AssertionError("images were made before the output folder was checked")


def test_sample_refuses_an_unwritable_out_before_sampling(digits_ckpt, tmp_path, monkeypatch):
    """``out=`` under a regular file cannot be created (whoever runs it, root included): the error names ``out=``
    before any image. (Before: every image was sampled first, then mkdir failed.)"""
    monkeypatch.setattr("lightning_diff.cli.sample.generate", _never)
    (tmp_path / "file").write_text("")
    out = tmp_path / "file" / "samples"
    with pytest.raises(OSError, match=rf"out={out}: cannot write to {out}"):
        sample(_sample_config(digits_ckpt, out))


def test_sample_refuses_a_read_only_out_before_sampling(digits_ckpt, read_only_copy, monkeypatch):
    monkeypatch.setattr("lightning_diff.cli.sample.generate", _never)
    out = read_only_copy(digits_ckpt).parent
    with pytest.raises(OSError, match=rf"out={out}: cannot write to {out}"):
        sample(_sample_config(digits_ckpt, out))


def test_evaluate_refuses_a_read_only_record_folder_before_any_image(digits_ckpt, read_only_copy, monkeypatch):
    """The record goes beside the checkpoint: a checkpoint in a read-only folder fails before the reference
    statistics and the sampling. (Before: after all of them, in write_record.)"""
    monkeypatch.setattr("lightning_diff.cli.evaluate.sample_quality", _never)
    ckpt = read_only_copy(digits_ckpt)
    cfg = compose_config("evaluate", [f"ckpt={ckpt}", "device=cpu", "progress=false", "metrics.num_samples=4"])
    with pytest.raises(OSError, match=rf"ckpt={ckpt} \(its eval-\*\.json goes beside it\): cannot write to "
                                      rf"{ckpt.parent}"):
        evaluate(cfg)


# --- item 11: Ctrl-C -----------------------------------------------------------------------------------------


def _first_line(proc: subprocess.Popen, timeout: float = 240.0) -> str:
    """The first line ``proc`` prints on stdout (a progress line once sampling has begun)."""
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    assert ready, f"no output in {timeout} s"
    return proc.stdout.readline()


def test_ctrl_c_during_sample_exits_130_with_one_line(digits_ckpt, tmp_path):
    """SIGINT while sampling: exit status 130, one line saying nothing was written, no traceback, no file. The
    first progress line (stdout is a pipe, not a terminal) says when sampling has begun."""
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "lightning_diff.cli.sample", f"ckpt={digits_ckpt}", "num_samples=1000", "device=cpu",
           "sampler.batch_size=1", f"out={out}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        line = _first_line(proc)
        assert "sampling (heun, 18 steps): 1/1000 images" in line, line
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert "Traceback" not in stderr, stderr[-3000:]
    assert stderr.strip().splitlines()[-1] == f"interrupted: nothing was written to {out}", stderr[-3000:]
    assert proc.returncode == 130
    assert list(out.iterdir()) == []

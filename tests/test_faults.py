"""Fault drills: nothing is lost and every failure says what happened.

- SIGKILL while a checkpoint or an evaluation record is written: the previous files stay loadable and a
  rerun finishes the job.
- A truncated, corrupted or other-version checkpoint: an error naming the file and what is wrong.
- NaN/Inf in a data batch: the step is skipped, counted and logged; a streak stops the run with a message.
- A read-only reference-statistics cache, a full disk, two runs started in the same second: a message
  naming the file, nothing overwritten.
(The DDP drill, one rank raising, is in tests/test_ddp.py.)
"""

import contextlib
import datetime
import errno
import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from hydra import compose as hydra_compose
from hydra import initialize_config_dir

from lightning_diff import formulations
from lightning_diff.checkpoint_io import (
    CHECKPOINT_FORMAT,
    FORMAT_KEY,
    AtomicCheckpointIO,
    CheckpointError,
    load_checkpoint,
    write_new_text,
)
from lightning_diff.config import CONFIG_DIR
from lightning_diff.data.loading import PointDataset, make_loader
from lightning_diff.evaluation.metrics.reference import ReferenceStats, load_reference, save_reference
from lightning_diff.evaluation.metrics.stats import FeatureStats
from lightning_diff.evaluation.records import write_record
from lightning_diff.networks import MLP
from lightning_diff.training.builders import load_module
from lightning_diff.training.module import DiffusionModule

from .test_resume import TINY, _assert_same_state, _run

ROOT = Path(__file__).resolve().parent.parent


def _wait_for(path: Path, process: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert process.poll() is None, f"the job ended (exit {process.returncode}) before {path.name} appeared"
        assert time.time() < deadline, f"{path.name} did not appear within {timeout} s"
        time.sleep(0.1)


# --- SIGKILL mid-write -------------------------------------------------------------------------------------

STALLING_SAVE = '''
import io
import time
from pathlib import Path

import pytorch_lightning as pl
import torch


class StallSave(pl.Callback):
    """Makes the checkpoint write of step >= ``from_step`` stop halfway: half its bytes are written, then
    ``marker`` is created and the process sleeps until the test kills it (changes nothing else)."""

    def __init__(self, marker, from_step):
        save = torch.save

        def stalling_save(obj, file, *args, **kwargs):
            if isinstance(obj, dict) and obj.get("global_step", 0) >= from_step:
                buffer = io.BytesIO()
                save(obj, buffer, *args, **kwargs)
                file.write(buffer.getvalue()[: buffer.tell() // 2])
                file.flush()
                Path(marker).touch()
                time.sleep(600)
            return save(obj, file, *args, **kwargs)

        torch.save = stalling_save
'''


def test_sigkill_while_a_checkpoint_is_written_keeps_the_previous_one(tmp_path):
    (tmp_path / "staller.py").write_text(STALLING_SAVE)
    out, marker = tmp_path / "run", tmp_path / "stalled"
    overrides = [*TINY, "~logger", f"hydra.run.dir={out}", "trainer.max_steps=20",  # checkpoints every 5 steps
                 "+callbacks.stall._target_=staller.StallSave", f"+callbacks.stall.marker={marker}",
                 "+callbacks.stall.from_step=10"]
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}", "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "lightning_diff.cli.train", *overrides], cwd=ROOT, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _wait_for(marker, process)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    checkpoints = out / "checkpoints"
    (partial,) = checkpoints.glob(".last.ckpt.*.tmp")  # the write of step 10 was cut halfway
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        load_checkpoint(partial)
    assert load_checkpoint(checkpoints / "last.ckpt")["global_step"] == 5  # the previous one, intact
    resumed = _run(out, 20, "~logger", "ckpt=last")  # the rerun finishes the job
    reference = _run(tmp_path / "reference", 20, "~logger")
    _assert_same_state(reference["checkpoint"], resumed["checkpoint"])


STALLING_RECORD = '''
import os
import sys
import time
from pathlib import Path

from lightning_diff.evaluation.records import write_record

checkpoint, marker = sys.argv[1:]


def stalling_fsync(fd):  # the record's bytes are written, not yet on disk nor in place
    Path(marker).touch()
    time.sleep(600)


os.fsync = stalling_fsync
write_record(Path(checkpoint).parent, {"metrics": {"fid": 2.0}}, name="drill")
'''


def test_sigkill_while_evaluate_writes_its_record_keeps_the_previous_results(tmp_path):
    checkpoint = tmp_path / "last.ckpt"
    checkpoint.touch()
    previous = write_record(tmp_path, {"metrics": {"fid": 1.0}}, name="drill")
    (tmp_path / "staller.py").write_text(STALLING_RECORD)
    marker = tmp_path / "stalled"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, str(tmp_path / "staller.py"), str(checkpoint), str(marker)],
                               cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _wait_for(marker, process)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert json.loads(Path(previous["path"]).read_text())["metrics"] == {"fid": 1.0}  # loadable, unchanged
    assert sorted(p.name for p in tmp_path.glob("eval-*")) == ["eval-drill.json"]  # nothing half-written
    rerun = write_record(tmp_path, {"metrics": {"fid": 2.0}}, name="drill")
    assert json.loads(Path(rerun["path"]).read_text())["metrics"] == {"fid": 2.0}
    assert Path(rerun["path"]).name == "eval-drill-1.json"


def test_an_evaluation_with_an_existing_name_never_replaces_its_results(tmp_path):
    """Two evaluations writing the same ``eval-<name>.json`` (concurrently or one after the other) keep both."""
    records = [write_record(tmp_path, {"metrics": {"fid": float(k)}}, name="same")
               for k in range(3)]
    assert [Path(r["path"]).name for r in records] == ["eval-same.json", "eval-same-1.json", "eval-same-2.json"]
    for k, record in enumerate(records):
        assert json.loads(Path(record["path"]).read_text())["metrics"] == {"fid": float(k)}


# --- damaged and foreign checkpoints -------------------------------------------------------------------------


def _rewrite(source: Path, target: Path, change) -> None:
    checkpoint = load_checkpoint(source)
    change(checkpoint)
    torch.save(checkpoint, target)


def _flip_bytes(source: Path, target: Path, where: float) -> None:
    data = bytearray(source.read_bytes())
    start = int(len(data) * where)
    data[start:start + 64] = bytes(b ^ 0xFF for b in data[start:start + 64])
    target.write_bytes(bytes(data))


DAMAGE = {
    "truncated": (lambda s, t: t.write_bytes(s.read_bytes()[: s.stat().st_size // 2]), "not a complete checkpoint"),
    "empty": (lambda s, t: t.write_bytes(b""), "not a complete checkpoint"),
    "not a checkpoint": (lambda s, t: t.write_text("hello"), "not a complete checkpoint"),
    "bits flipped in the tensor data": (lambda s, t: _flip_bytes(s, t, 0.5), r"fails its CRC-32 check"),
    "no format version": (lambda s, t: _rewrite(s, t, lambda c: c.pop(FORMAT_KEY)), f"has no {FORMAT_KEY}"),
    "a newer format": (lambda s, t: _rewrite(s, t, lambda c: c.update({FORMAT_KEY: CHECKPOINT_FORMAT + 1})),
                       rf"{FORMAT_KEY}={CHECKPOINT_FORMAT + 1}; this version of lightning_diff reads format "
                       rf"{CHECKPOINT_FORMAT} only"),
    "not a dict": (lambda s, t: torch.save([1, 2], t), "holds a list, not a checkpoint dict"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_or_foreign_checkpoint_raises_naming_the_file_and_the_fault(tmp_path, digits_ckpt, damage):
    make, fault = DAMAGE[damage]
    path = tmp_path / "last.ckpt"
    make(Path(digits_ckpt), path)
    for loader in (load_checkpoint, load_module, AtomicCheckpointIO().load_checkpoint):
        with pytest.raises(CheckpointError, match=rf"^{path}.*{fault}") as caught:
            loader(str(path))
        error = caught.value  # no chained traceback from inside torch
        assert error.__cause__ is None and (error.__context__ is None or error.__suppress_context__)


def test_a_checkpoint_without_run_config_cannot_be_rebuilt(tmp_path, digits_ckpt):
    path = tmp_path / "last.ckpt"
    _rewrite(Path(digits_ckpt), path, lambda c: c.pop("run_config"))
    with pytest.raises(ValueError, match=rf"{path} holds no run_config"):
        load_module(str(path))


def test_resuming_from_a_truncated_checkpoint_names_it(tmp_path):
    first = _run(tmp_path / "run", 5, "~logger")
    last = Path(first["checkpoint"])
    last.write_bytes(last.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=rf"{last} is not a complete checkpoint"):
        _run(tmp_path / "run", 10, "~logger", "ckpt=last")


# --- non-finite data -----------------------------------------------------------------------------------------


class Snapshots(DiffusionModule):
    """Records the parameters before every training batch."""

    def on_train_batch_start(self, batch, batch_idx):
        self.snapshots = [*getattr(self, "snapshots", []), [p.detach().clone() for p in self.parameters()]]


def _fit_on(points, steps, **module_kwargs):
    module = Snapshots(MLP(dim=2, hidden=16, depth=1, emb_channels=8), formulations.get("edm"),
                       optimizer=lambda p: torch.optim.Adam(p, lr=1e-2), **module_kwargs)
    trainer = pl.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0)
    loader = make_loader(PointDataset(points, torch.zeros(len(points), dtype=torch.long)), batch_size=8,
                         shuffle=False, seed=0)
    trainer.fit(module, loader)
    return module, trainer


def test_nonfinite_values_in_a_data_batch_are_skipped_counted_and_logged():
    points = torch.randn(64, 2)
    points[2 * 8 + 3, 0] = float("nan")  # one value in batch 2
    points[3 * 8, 1] = float("inf")  # one value in batch 3
    module, trainer = _fit_on(points, 6)
    assert module.nonfinite_steps == 2
    assert float(trainer.callback_metrics["train/nonfinite_steps"]) == 2.0
    before, after = module.snapshots[2], module.snapshots[4]  # batches 2 and 3 left every weight alone
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(module.snapshots[4], module.snapshots[5], strict=True))
    assert all(p.isfinite().all() for p in module.parameters())


def test_a_streak_of_nonfinite_data_stops_the_run_with_a_message():
    points = torch.randn(64, 2)
    points[:, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="3 optimizer steps in a row had non-finite gradients"):
        _fit_on(points, 10, max_nonfinite_steps=3)


# --- read-only cache, full disk, runs started in the same second --------------------------------------------


@contextlib.contextmanager
def file_size_limit(nbytes: int):
    """The kernel refuses to grow any file of this process past ``nbytes`` (``EFBIG``), as a full disk
    refuses a write (``RLIMIT_FSIZE``, with ``SIGXFSZ`` ignored so that the write fails instead of the
    process)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)


@pytest.fixture
def read_only(monkeypatch):
    """``read_only(folder)``: creating a file or folder under ``folder`` fails with ``EACCES``, as in a
    read-only folder. Simulated at ``os.open``/``os.mkdir`` (what ``tempfile`` and ``Path.mkdir`` call),
    since ``chmod`` does not stop root."""
    folders = []
    real_open, real_mkdir = os.open, os.mkdir

    def refused(path) -> bool:
        return any(Path(path).resolve().is_relative_to(folder) for folder in folders)

    def guarded_open(path, flags, *args, **kwargs):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and refused(path):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real_open(path, flags, *args, **kwargs)

    def guarded_mkdir(path, *args, **kwargs):
        if refused(path) and not Path(path).is_dir():
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", guarded_open)
    monkeypatch.setattr(os, "mkdir", guarded_mkdir)
    return lambda folder: folders.append(Path(folder).resolve())


def _reference() -> ReferenceStats:
    return ReferenceStats(FeatureStats.of(torch.randn(50, 4, dtype=torch.float64)), "extractor-x",
                          meta={"num_images": 50})


def test_a_read_only_reference_cache_is_read_and_refuses_writes_with_a_message(tmp_path, read_only):
    save_reference("digits-train-8px-x", _reference(), tmp_path)
    read_only(tmp_path)
    loaded = load_reference("digits-train-8px-x", "extractor-x", tmp_path)  # reading needs no write
    assert loaded.meta == {"num_images": 50}
    with pytest.raises(PermissionError, match=rf"could not write {tmp_path}/reference/new\.npz: Permission "
                                              "denied") as caught:
        save_reference("new", _reference(), tmp_path)
    assert "metrics.cache_dir" in caught.value.__notes__[0]
    assert sorted(p.name for p in (tmp_path / "reference").iterdir()) == ["digits-train-8px-x.npz"]


def test_a_full_disk_keeps_the_previous_files_and_says_which_write_failed(tmp_path):
    io, checkpoint = AtomicCheckpointIO(), tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1}, checkpoint)
    text = tmp_path / "eval-a.json"
    text.write_text("{}")
    save_reference("ref", _reference(), tmp_path)
    reference = tmp_path / "reference" / "ref.npz"
    before = {p: p.read_bytes() for p in (checkpoint, text, reference)}
    big = torch.zeros(1_000_000)  # 4 MB, past the limit
    with file_size_limit(64 * 1024):
        with pytest.raises(OSError, match=rf"could not write {checkpoint}: .*MiB free in {tmp_path}.*unchanged"):
            io.save_checkpoint({"step": 2, "big": big}, checkpoint)
        with pytest.raises(OSError, match=rf"could not write {text}: File too large"):
            write_new_text(text, "x" * 1_000_000)
        with pytest.raises(OSError, match=rf"could not write {reference}: File too large"):
            save_reference("ref", ReferenceStats(FeatureStats.of(torch.randn(50, 4, dtype=torch.float64)), "x",
                                                 pool3=big.reshape(-1, 4)), tmp_path)
    assert {p: p.read_bytes() for p in before} == before  # every previous file is intact
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["eval-a.json", "last.ckpt", "ref.npz", "reference"]


class FrozenClock(datetime.datetime):
    @classmethod
    def now(cls, tz=None):
        return cls(2026, 1, 1, 12, 0, 0)


def _run_dir(monkeypatch) -> str:
    monkeypatch.setattr("hydra.core.utils.datetime", FrozenClock)  # Hydra's ${now:...} resolver
    with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
        cfg = hydra_compose("train", return_hydra_config=True)
    return cfg.hydra.run.dir


def test_runs_started_in_the_same_second_get_different_directories(monkeypatch):
    first, second = _run_dir(monkeypatch), _run_dir(monkeypatch)
    assert first.startswith("outputs/train/train/2026-01-01_12-00-00")
    assert first != second


SAME_SECOND = '''
import datetime
import runpy

import hydra.core.utils


class FrozenClock(datetime.datetime):
    @classmethod
    def now(cls, tz=None):
        return cls(2026, 1, 1, 12, 0, 0)


hydra.core.utils.datetime = FrozenClock  # both runs start "in the same second"
runpy.run_module("lightning_diff.cli.train", run_name="__main__")
'''


def test_two_runs_started_in_the_same_second_keep_their_own_outputs(tmp_path):
    (tmp_path / "same_second.py").write_text(SAME_SECOND)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    overrides = [o for o in TINY if not o.startswith("callbacks.checkpoint.")] + ["~logger", "trainer.max_steps=2"]
    processes = [subprocess.Popen([sys.executable, "same_second.py", *overrides, f"seed={seed}"], cwd=tmp_path,
                                  env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for seed in (1, 2)]
    for process in processes:
        _, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, stderr[-3000:]
    runs = sorted((tmp_path / "outputs" / "train" / "train").iterdir())
    assert len(runs) == 2 and all(r.name.startswith("2026-01-01_12-00-00_") for r in runs)
    seeds = sorted(load_checkpoint(r / "checkpoints" / "last.ckpt")["run_config"]["seed"] for r in runs)
    assert seeds == [1, 2]  # each run's checkpoint is its own


def test_ckpt_last_in_a_run_without_checkpoint_stops_and_says_where_it_looked(tmp_path):
    with pytest.raises(FileNotFoundError, match=rf"ckpt=last: no last.ckpt in {tmp_path}/checkpoints\. "
                                                r".*hydra\.run\.dir=<that run's directory> ckpt=last"):
        _run(tmp_path, 5, "~logger", "ckpt=last")


def test_ckpt_last_if_exists_starts_from_scratch_then_resumes(tmp_path, caplog):
    first = _run(tmp_path, 5, "~logger", "ckpt=last_if_exists")  # a first start: nothing to resume
    assert load_checkpoint(first["checkpoint"])["global_step"] == 5
    with caplog.at_level("INFO"):
        second = _run(tmp_path, 10, "~logger", "ckpt=last_if_exists")  # a requeue: resumes
    assert f"Resumed from {tmp_path}/checkpoints/last.ckpt at global step 5" in caplog.text
    assert load_checkpoint(second["checkpoint"])["global_step"] == 10


def test_a_missing_checkpoint_file_is_named(tmp_path):
    missing = tmp_path / "nope.ckpt"
    with pytest.raises(FileNotFoundError, match=rf"ckpt={missing}: no such file; allowed: a checkpoint "
                                                "file, last"):
        _run(tmp_path, 5, "~logger", f"ckpt={missing}")


# --- what a failed run leaves, run length, file modes ------------------------------------------------------


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002], ids=["022", "077", "002"])
def test_checkpoints_records_and_the_reference_cache_follow_the_umask(tmp_path, umask):
    """The oracle is ``open()``: a file it creates under the same umask (0644 under umask 022). Before, the atomic
    writes' ``tempfile.mkstemp`` made every checkpoint, record and cache file 0600."""
    previous = os.umask(umask)
    try:
        plain = tmp_path / "plain"
        plain.write_bytes(b"")
        checkpoint = tmp_path / "last.ckpt"
        AtomicCheckpointIO().save_checkpoint({"step": 1}, checkpoint)
        written = [checkpoint, write_new_text(tmp_path / "eval-a.json", "{}"),
                   save_reference("ref", _reference(), tmp_path)]
    finally:
        os.umask(previous)
    expected = plain.stat().st_mode & 0o777
    assert expected == 0o666 & ~umask
    assert {path.name: oct(path.stat().st_mode & 0o777) for path in written} == {
        path.name: oct(expected) for path in written}


@pytest.mark.parametrize("length", [["trainer.max_steps=0"], ["trainer.max_steps=-3"],
                                    ["trainer.max_steps=-1", "trainer.max_epochs=-1"]],
                         ids=["zero", "negative", "unbounded"])
def test_a_run_length_that_trains_nothing_or_never_ends_is_refused(tmp_path, length):
    with pytest.raises(ValueError, match=r"trainer\.max_steps=-?\d+ .*allowed: an integer >= 1 .* or -1 with "
                                         r"trainer\.max_epochs >= 1"):
        _run(tmp_path, 5, "~logger", *length)
    assert not (tmp_path / "checkpoints").exists()


def _train_process(tmp_path, *overrides) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "lightning_diff.cli.train", *TINY, "~logger", *overrides], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)


def test_a_run_that_fails_before_training_leaves_no_run_folder(tmp_path):
    out = tmp_path / "run"
    done = _train_process(tmp_path, f"hydra.run.dir={out}", "trainer.max_steps=0")
    assert done.returncode == 1, done.stdout[-2000:]  # before: exit 0, a folder with a step-0 last.ckpt
    assert "trainer.max_steps=0" in done.stderr
    assert not out.exists()


FAILING_CALLBACK = '''
import pytorch_lightning as pl


class FailAt(pl.Callback):
    """Raises at the end of training step ``step`` (a drill)."""

    def __init__(self, step):
        self.step = step

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == self.step:
            raise RuntimeError(f"drill at step {self.step}")
'''


def test_a_run_that_fails_keeps_its_folder_and_its_train_log_says_why(tmp_path):
    out = tmp_path / "run"
    _run(out, 5, "~logger")
    (tmp_path / "failer.py").write_text(FAILING_CALLBACK)
    done = _train_process(tmp_path, f"hydra.run.dir={out}", "ckpt=last", "trainer.max_steps=10",
                          "+callbacks.fail._target_=failer.FailAt", "+callbacks.fail.step=7")
    assert done.returncode == 1 and "drill at step 7" in done.stderr, done.stderr[-2000:]
    log = (out / "train.log").read_text()
    assert f"Resumed from {out}/checkpoints/last.ckpt at global step 5" in log
    assert "Traceback" in log and "RuntimeError: drill at step 7" in log  # before: train.log had no error
    assert load_checkpoint(out / "checkpoints" / "last.ckpt")["global_step"] == 5  # nothing of value removed

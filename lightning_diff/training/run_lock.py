"""One run per folder: a training run holds an OS lock on ``<run folder>/.lock`` while it runs
(docs/distributed.md#checkpoints-and-resume).

Two runs in one ``hydra.run.dir`` would overwrite each other's checkpoints, samples and ``.hydra/``. So:

- ``RunFolderLock``, a Hydra callback (``hydra.callbacks`` of ``configs/train.yaml``), takes the lock on
  ``hydra.run.dir`` (``hydra.sweep.dir`` for ``-m``) in ``on_run_start``, before Hydra creates the folder's
  ``.hydra/`` and log file, and gives it back at ``on_run_end``. A second run refuses (``RunFolderInUse``, exit code
  1) naming the folder and the holder's PID and host, before touching anything in the folder but ``.lock``.
- ``lightning_diff.cli.train.train`` holds the lock on ``paths.output_dir`` too (re-entrant within a process), which
  covers runs started from Python and the jobs of a multirun.
- The lock is ``fcntl.flock``: the kernel drops it when its process ends, however it ends. A lock file that still
  names a holder when its lock is free was left by a killed or crashed run; it is taken over with a warning.
- Only the process of global rank 0 takes it (``RANK``, ``LOCAL_RANK``, ``NODE_RANK``, ``SLURM_PROCID`` all 0 or
  unset): the other processes of a DDP run (torchrun, Lightning's launcher, srun) share the folder of their rank 0.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

__all__ = ["LOCK_NAME", "RunFolderInUse", "RunFolderLock", "hold_run_folder", "is_global_rank_zero"]

log = logging.getLogger(__name__)

LOCK_NAME = ".lock"  # <run folder>/.lock: the holder's PID, host and start time (one JSON line)
_RANK_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID")  # torchrun, Lightning's launcher, SLURM
_held: dict[str, list[int]] = {}  # real path of a lock file -> [file descriptor, depth], this process's locks


class RunFolderInUse(RuntimeError):
    """Another running process holds the lock of the run folder."""


def is_global_rank_zero(environ: Mapping[str, str] = os.environ) -> bool:
    """True unless a launcher's rank variable (``RANK``, ``LOCAL_RANK``, ``NODE_RANK``, ``SLURM_PROCID``) is set
    to something other than 0: the process that owns the run folder."""
    return all(environ.get(name, "0") == "0" for name in _RANK_VARIABLES)


@contextlib.contextmanager
def hold_run_folder(folder: str | os.PathLike, setting: str = "paths.output_dir") -> Iterator[None]:
    """Hold the lock of run folder ``folder`` (created when missing) for the ``with`` block.

    Re-entrant within a process; a no-op on processes of rank > 0 (``is_global_rank_zero``). ``setting`` names the
    setting that chose the folder, for the error. Raises ``RunFolderInUse`` naming the folder, the setting and the
    holder's PID and host when another process holds it."""
    if not is_global_rank_zero():
        yield
        return
    Path(folder).mkdir(parents=True, exist_ok=True)
    path = os.path.realpath(Path(folder) / LOCK_NAME)
    if path in _held:
        _held[path][1] += 1
    else:
        fd = _acquire(path, setting)
        if fd is None:  # the file system cannot lock: warned, the run goes on unprotected
            yield
            return
        _held[path] = [fd, 1]
    try:
        yield
    finally:
        _held[path][1] -= 1
        if _held[path][1] == 0:
            _release(_held.pop(path)[0])


def _acquire(path: str, setting: str) -> int | None:
    """Lock ``path`` exclusively without waiting and write this process into it; its file descriptor, or None
    when the file system has no ``flock`` (a warning)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        holder = _read_holder(fd)
        os.close(fd)
        if error.errno not in (errno.EAGAIN, errno.EWOULDBLOCK):
            log.warning("%s: cannot lock %s (%s); nothing stops another run from writing into this folder",
                        setting, path, error.strerror)
            return None
        folder = os.path.dirname(path)
        raise RunFolderInUse(
            f"{setting}={folder} is in use by {_describe(holder)} (it holds {path}): two runs in one folder "
            "overwrite each other's checkpoints, samples and .hydra/. Wait for that run to end, stop it, or give "
            "this run another folder (by default every run gets a new one)") from None
    stale = _read_holder(fd)
    if stale:
        log.warning("%s: taking over the stale lock of %s, which ended without releasing it (killed or crashed)",
                    path, _describe(stale))
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
    return fd


def _release(fd: int) -> None:
    """Empty the lock file (no holder: the next run takes it over silently), unlock and close it."""
    os.ftruncate(fd, 0)
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)


def _read_holder(fd: int) -> dict:
    """What the holder wrote into the lock file (``{}`` when empty or unreadable)."""
    try:
        holder = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _describe(holder: dict) -> str:
    if "pid" not in holder:
        return "another process (its PID is not written yet)"
    return f"PID {holder['pid']} on host {holder.get('host', '?')} (started {holder.get('started', '?')})"


class RunFolderLock(Callback):
    """Hydra callback holding the lock of ``hydra.run.dir`` (``hydra.sweep.dir`` under ``-m``) from before Hydra
    writes into it until the run ends (``configs/train.yaml``: ``hydra.callbacks.run_folder_lock``)."""

    def __init__(self):
        self._locks = contextlib.ExitStack()

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        self._hold(config, "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        self._hold(config, "hydra.sweep.dir")

    def on_run_end(self, config: DictConfig, **kwargs) -> None:
        self._locks.close()

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        self._locks.close()

    def _hold(self, config: DictConfig, key: str) -> None:
        """Hydra turns an exception of a callback into a warning (``hydra._internal.callbacks``) and runs on: a
        refusal ends the process here instead, with the message and exit code 1 (``SystemExit``)."""
        folder = _resolve_folder(config, key)
        try:
            self._locks.enter_context(hold_run_folder(folder, key))
        except RunFolderInUse as refusal:
            raise SystemExit(f"RunFolderInUse: {refusal}") from refusal


def _resolve_folder(config: DictConfig, key: str) -> str:
    """The absolute folder of ``key`` (``hydra.run.dir``), as Hydra's ``run_job`` resolves it: with ``HydraConfig``
    set for ``${hydra:...}`` (then restored: Hydra sets it itself), on ``config`` itself, so that the cached
    ``${now:...}`` and ``${run_id:}`` give Hydra the same folder."""
    hydra_config = HydraConfig.instance()
    previous = hydra_config.cfg
    hydra_config.set_config(config)
    OmegaConf.set_readonly(config.hydra, False)  # as composed (set_config makes it read-only)
    try:
        return os.path.abspath(str(OmegaConf.select(config, key)))
    finally:
        hydra_config.cfg = previous

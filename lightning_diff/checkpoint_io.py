"""Checkpoint files: written atomically, read without running code, and the data-loader position.

- ``atomic_write`` / ``write_new_text``: a file is either the old one (or absent) or the complete new one,
  never a torn write (a job killed while saving, a full disk): write a temporary file in the same folder,
  ``fsync``, then ``os.replace`` (or a hard link, which refuses to replace), both atomic on POSIX.
  ``atomic_write_all`` replaces several files as one unit; ``check_writable`` probes an output folder up front.
- ``AtomicCheckpointIO``: Lightning's checkpoint plugin writing with ``atomic_write`` and reading with
  ``load_checkpoint``. Lightning's ``TorchCheckpointIO`` relies on an fsspec transaction whose local commit
  is a move without ``fsync``; we state the guarantee here once.
- ``load_checkpoint``: ``torch.load(weights_only=True)``, so a crafted file cannot run code, with an error
  naming the file and what is wrong when it is truncated, corrupted, unsafe or of another format.
- ``ResumableDataLoader``: a ``DataLoader`` with ``state_dict``/``load_state_dict`` (Lightning saves them in
  the checkpoint's loop state and restores them before the first batch), so a run resumed mid-epoch
  continues with the next batch of the same epoch instead of restarting the epoch.
"""

from __future__ import annotations

import itertools
import logging
import os
import pickle
import secrets
import shutil
import tempfile
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any

import torch
from lightning_fabric.plugins.io import TorchCheckpointIO
from torch.utils.data import DataLoader

__all__ = ["CHECKPOINT_FORMAT", "FORMAT_KEY", "AtomicCheckpointIO", "CheckpointError", "ResumableDataLoader",
           "atomic_write", "atomic_write_all", "check_format", "check_writable", "default_cache_dir", "load_checkpoint",
           "write_new_text"]

log = logging.getLogger(__name__)

FORMAT_KEY = "lightning_diff_format"  # checkpoint key holding the format version
CHECKPOINT_FORMAT = 1  # the version this code writes and reads; raise it when the checkpoint content changes


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be used: truncated, corrupted, asking for code, or of another format."""


def default_cache_dir() -> Path:
    """``$LIGHTNING_DIFF_CACHE`` or ``~/.cache/lightning_diff``: converted weights, reference statistics, Analytic-DPM
    moments, the small digits classifier."""
    return Path(os.environ.get("LIGHTNING_DIFF_CACHE", Path.home() / ".cache" / "lightning_diff"))


# --- writing ------------------------------------------------------------------------------------------------


def _write_temporary(path: Path, write: Callable[[IO[bytes]], Any]) -> str:
    """``write(file)`` into a new temporary file beside ``path``, flushed and fsynced; returns its name.
    On any error the temporary file is removed; I/O errors (a full disk, a read-only folder) are raised
    as ``OSError`` naming ``path``."""
    temporary = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = _create_temporary(path)
        with os.fdopen(handle, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        return temporary
    except BaseException as error:
        if temporary is not None:
            Path(temporary).unlink(missing_ok=True)
        if not isinstance(error, (OSError, RuntimeError)):  # torch.save reports a failed write as a RuntimeError
            raise
        code = getattr(error, "errno", None)
        message = (f"could not write {path}: {error.strerror if code else error} ({_free_space(path)}); "
                   f"{path.name} is unchanged")
        raise (OSError(code, message) if code else OSError(message)) from error


def _create_temporary(path: Path) -> tuple[int, str]:
    """A new empty file ``.<name>.<8 hex digits>.tmp`` beside ``path``, open for writing: its descriptor and name.
    Its mode is what ``open()`` gives a new file, 0o666 less the umask (0644 under umask 022), which ``os.replace``
    keeps; ``tempfile.mkstemp`` would make it 0600, unreadable to the colleagues sharing a cluster folder.
    ``O_EXCL``: an existing file is never opened."""
    while True:
        name = str(path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            return os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), name
        except FileExistsError:  # taken by a concurrent writer: draw another name
            continue


def _free_space(path: Path) -> str:
    folder = next(p for p in (path.parent, *path.parents) if p.exists())  # "." or "/" at the latest
    return f"{shutil.disk_usage(folder).free / 2**20:.1f} MiB free in {folder}"


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], Any]) -> Path:
    """Replace ``path`` atomically by what ``write(file)`` writes into a binary file; returns ``path``.
    Until the write completed and reached the disk, ``path`` keeps its old content (or stays absent)."""
    return atomic_write_all({path: write})[0]


def atomic_write_all(writes: Mapping[str | os.PathLike, Callable[[IO[bytes]], Any]]) -> list[Path]:
    """Replace several files as one unit (``samples.npz`` with its ``samples.png``): each ``write(file)`` goes to
    its own temporary file, fsynced, and only once all of them are on the disk are they renamed into place (the
    renames write no data). A failed write (a full disk) or an interrupt before that leaves every path as it was,
    old content or absent, and no temporary file. Returns the paths, in the order of ``writes``."""
    paths, temporaries = [Path(p) for p in writes], []
    try:
        for path, write in zip(paths, writes.values(), strict=True):
            temporaries.append(_write_temporary(path, write))
        for temporary, path in zip(temporaries, paths, strict=True):
            os.replace(temporary, path)
    except BaseException:
        for temporary in temporaries:
            Path(temporary).unlink(missing_ok=True)
        raise
    return paths


def write_new_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) atomically to ``path`` without ever replacing a file: when ``path`` exists
    (an earlier or concurrent job with the same name) the text goes to the first free ``<stem>-1<suffix>``,
    ``<stem>-2<suffix>``... with a warning. Returns the path written."""
    path = Path(path)
    temporary = _write_temporary(path, lambda file: file.write(text.encode()))
    try:
        for number in itertools.count():
            target = path if number == 0 else path.with_name(f"{path.stem}-{number}{path.suffix}")
            try:
                os.link(temporary, target)  # atomic, and fails when target exists (os.replace would not)
                break
            except FileExistsError:
                continue
    finally:
        os.unlink(temporary)
    if target != path:
        log.warning("%s exists (another job with the same name); wrote %s instead", path, target.name)
    return target


def update_digest(digest, tensors, prefix: str = "") -> None:
    """Feed the tensors of ``tensors`` (a state dict, or nested dicts of them; other entries are skipped) into the
    hashlib object ``digest``: per tensor, in sorted key order, ``"<key>|<dtype>|<shape>|"`` and its bytes (nested
    keys joined with ``.``). Identifies weights by their values, not by how a file stores them (``torch.save``
    writes the archive's folder name into the file). Used for the Analytic-DPM / tune-steps / reflow fingerprints
    (``sampling.analytic_dpm.fingerprint``) and the feature extractors' labels (``metrics.extractor``)."""
    for key in sorted(tensors, key=str):
        value, name = tensors[key], f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, torch.Tensor):
            data = value.detach().to("cpu").contiguous()
            digest.update(f"{name}|{data.dtype}|{tuple(data.shape)}|".encode())
            digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes() if data.numel() else b"")
        elif isinstance(value, Mapping):
            update_digest(digest, value, name)


def check_writable(folder: str | os.PathLike, setting: str) -> Path:
    """Create ``folder`` (with its parents) and write and remove a probe file in it, so that an output folder
    the run cannot write fails before the work instead of after it. ``setting`` says where the folder comes
    from (``out=samples``). Returns the folder; raises ``OSError`` (its errno kept) naming ``setting``, the
    folder and the reason."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle, probe = tempfile.mkstemp(prefix=".write-probe.", dir=folder)
        os.close(handle)
        os.unlink(probe)
    except OSError as error:
        raise OSError(error.errno, f"{setting}: cannot write to {folder} ({error.strerror or error}); allowed: a "
                      "folder this user can create and write") from None
    return folder


# --- reading ------------------------------------------------------------------------------------------------


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu", mmap: bool = False) -> dict:
    """The checkpoint at ``path`` (written by ``lightning_diff.cli.train``), loaded without running any code.

    ``torch.load(weights_only=True)`` unpickles only tensors, storages, ``OrderedDict``, ``torch.Size``,
    dtypes and plain containers and scalars, which is all our checkpoints hold: ``run_config`` is a plain
    dict, optimizer and scheduler states are dicts of tensors and numbers (``lightning_diff.training.optim`` stores
    its multipliers as their attribute dicts). No class is added to that allowlist. Raises
    ``FileNotFoundError``, or ``CheckpointError`` naming the file and what is wrong: truncated or not a
    checkpoint, a record failing its CRC-32 (checked unless ``mmap``, which reads no tensor data), a
    global it asks for that is refused (it could run code), or a format this version does not read.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    _check_archive(path, verify_records=not mmap)
    try:
        checkpoint = torch.load(path, map_location=map_location, mmap=mmap, weights_only=True)
    except pickle.UnpicklingError as error:
        refused = _refused_globals(path)
        if refused:
            raise CheckpointError(f"{path} asks for {', '.join(refused)}, which no lightning_diff checkpoint holds; "
                                  "refused, since loading it could run code. Load only files you trust, or "
                                  "a file written by lightning_diff.cli.train") from None
        raise CheckpointError(f"{path} is corrupted: its pickle does not load ({error})") from None
    except Exception as error:  # e.g. a damaged record when the CRC-32 check was skipped (mmap)
        raise CheckpointError(f"{path} does not load: {type(error).__name__}: {error}") from None
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{path} holds a {type(checkpoint).__name__}, not a checkpoint dict")
    check_format(checkpoint, path)
    return checkpoint


def _refused_globals(path: Path) -> list[str]:
    """The globals in ``path``'s pickle that ``weights_only`` refuses (read from its opcodes, nothing runs)."""
    try:
        return torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # a pickle too damaged to list them: the caller reports it as corrupted
        return []


def _check_archive(path: Path, verify_records: bool) -> None:
    """Raise ``CheckpointError`` unless ``path`` is a complete zip archive (``torch.save``'s format), each
    record matching its CRC-32 when ``verify_records`` (torch's reader does not check them)."""
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip() if verify_records else None
    except zipfile.BadZipFile as error:
        raise CheckpointError(f"{path} is not a complete checkpoint ({path.stat().st_size} bytes, {error}): "
                              "truncated by an interrupted write or copy, or not a file written by torch.save"
                              ) from None
    if damaged is not None:
        raise CheckpointError(f"{path} is corrupted: its record {damaged} fails its CRC-32 check (a damaged "
                              "disk or copy); use an earlier checkpoint")


def check_format(checkpoint: dict, path: str | os.PathLike) -> None:
    """Raise ``CheckpointError`` unless ``checkpoint[FORMAT_KEY]`` is ``CHECKPOINT_FORMAT``."""
    version = checkpoint.get(FORMAT_KEY)
    if version is None:
        raise CheckpointError(f"{path} has no {FORMAT_KEY}: it was not written by lightning_diff.cli.train, or by "
                              f"a version older than format {CHECKPOINT_FORMAT}; this version reads format "
                              f"{CHECKPOINT_FORMAT} only")
    if version != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} has {FORMAT_KEY}={version!r}; this version of lightning_diff reads format "
                              f"{CHECKPOINT_FORMAT} only (load it with the version that wrote it)")


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local writes are atomic (``atomic_write``) and whose reads, a resume
    included, go through ``load_checkpoint`` (``weights_only=True`` whatever Lightning asks for). Remote
    URLs (``s3://``...) go through Lightning's fsspec path (object stores replace whole objects)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        if storage_options is not None:
            raise ValueError(f"AtomicCheckpointIO: storage_options={storage_options!r} is not supported for "
                             "local paths; allowed: None")
        atomic_write(path, lambda file: torch.save(checkpoint, file))

    def load_checkpoint(self, path, map_location: Any = "cpu", weights_only: bool | None = None) -> dict[str, Any]:
        if "://" in str(path):
            checkpoint = super().load_checkpoint(path, map_location, weights_only=True)
            check_format(checkpoint, path)
            return checkpoint
        return load_checkpoint(path, map_location)


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` that remembers how many batches of the current epoch it has handed out.

    ``state_dict()`` -> ``{"batches": n, "generator": state}``; after ``load_state_dict`` the next
    ``iter()`` skips the first ``n`` batches by index (no data is loaded for them) and reuses the
    loader generator's state from the start of that epoch (the worker seeds). The epoch's order comes from
    the sampler (``set_epoch``), which Lightning restores. A loader saved at the end of an epoch resumes
    at the start of the next one.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._batches = 0  # handed out in the current epoch
        self._skip = 0
        self._epoch_generator_state = None

    @property
    def _index_sampler(self):
        # The batches of indices DataLoader's iterator draws from (a private DataLoader property, read once
        # when an iterator is made; there is no public hook to start an epoch at batch n).
        batches = super()._index_sampler
        return _SkipOnce(batches, self._skip) if self._skip else batches

    def __iter__(self):
        if self.generator is not None:
            if self._skip and self._epoch_generator_state is not None:
                self.generator.set_state(self._epoch_generator_state)
            self._epoch_generator_state = self.generator.get_state()
        self._batches = self._skip
        iterator = super().__iter__()
        self._skip = 0
        return self._count(iterator)

    def _count(self, iterator):
        for batch in iterator:
            self._batches += 1
            yield batch

    def state_dict(self) -> dict[str, Any]:
        return {"batches": self._batches, "generator": self._epoch_generator_state}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._skip = state_dict["batches"] if state_dict["batches"] < len(self) else 0
        self._epoch_generator_state = state_dict["generator"]


class _SkipOnce:
    """Iterable over ``batches`` whose first iteration starts at batch ``skip`` (later ones at 0)."""

    def __init__(self, batches, skip: int):
        self.batches, self.skip = batches, skip

    def __iter__(self):
        skip, self.skip = self.skip, 0
        return itertools.islice(iter(self.batches), skip, None)

    def __len__(self) -> int:
        return len(self.batches)

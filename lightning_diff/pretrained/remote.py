"""Remote sources of released checkpoints: ``https://`` URLs and Hugging Face Hub ids, downloaded once and verified.

- ``https://host/path/file.pkl``: downloaded into ``<cache>/<host>/<path>`` (``<cache>`` is
  ``$LIGHTNING_DIFF_CACHE/pretrained``, default ``~/.cache/lightning_diff/pretrained``), atomically (a temporary
  file beside it, then a rename: a killed download leaves nothing behind), checked against the server's
  ``Content-Length``, and its SHA-256 written beside it (``<file>.sha256``). Every later use re-hashes the file
  and compares (a truncated or altered cache entry is an error, never a silent re-download); a ``sha256=`` flag
  also compares against a known digest (e.g. from a model card).
- ``hf://org/name`` (a whole repository: a diffusers folder) or ``hf://org/name/path/in/repo.pt`` (one file):
  fetched with ``huggingface_hub`` (its own download, cache under ``<cache>/hf`` and checks). Only the ``hf://``
  form is a Hub id: a bare ``org/name`` is a local path (a folder of that name that does not exist is an error
  that suggests ``hf://``), so that a typo in a local path never goes to the network.

Without network the error names the URL and the exact local path to put the file at.
"""

from __future__ import annotations

import hashlib
import os
import re
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from ..checkpoint_io import atomic_write

__all__ = ["DownloadError", "cache_root", "is_remote", "resolve", "url_cache_path", "download"]

HF_PREFIX = "hf://"
_CHUNK = 1 << 20  # bytes read and hashed at a time


class DownloadError(Exception):
    """A remote source that could not be fetched or whose file fails its checks."""


def cache_root() -> Path:
    """``$LIGHTNING_DIFF_CACHE/pretrained``, default ``~/.cache/lightning_diff/pretrained``."""
    return Path(os.environ.get("LIGHTNING_DIFF_CACHE", Path.home() / ".cache" / "lightning_diff")) / "pretrained"


def is_remote(source) -> bool:
    """True for ``https://`` / ``http://`` URLs and ``hf://`` Hub ids."""
    return isinstance(source, str) and source.startswith(("https://", "http://", HF_PREFIX))


def resolve(source, *, sha256: str | None = None, timeout: float = 60.0) -> Path:
    """The local path of ``source``: a local file or folder as is; a URL or Hub id downloaded (once) and verified.

    Args:
        source: a path, ``https://...`` or ``hf://org/name[/file]``.
        sha256: expected hex digest of a single file (URLs, Hub files and local files alike), or None.
        timeout: seconds to wait for the server before giving up.
    Raises:
        FileNotFoundError: a local path that does not exist (naming it).
        DownloadError: no network, a server error, a size or digest mismatch (naming the URL and the cache path).
    """
    if isinstance(source, str) and source.startswith(HF_PREFIX):
        path = _hub_download(source[len(HF_PREFIX):])
    elif is_remote(source):
        path = download(source, timeout=timeout)
    else:
        path = Path(source).expanduser()
        if not path.exists():
            hint = (f"; for the Hugging Face Hub repository {source!r} write hf://{source}"
                    if re.fullmatch(r"[\w.-]+/[\w.-]+", str(source)) else "")
            raise FileNotFoundError(f"ckpt={source}: no such file or folder{hint}")
    if sha256 is not None:
        _check_digest(path, sha256.lower(), f"sha256={sha256}")
    return path


def url_cache_path(url: str) -> Path:
    """Where ``url`` is cached: ``<cache>/<host>/<path>`` (a query string adds a short hash to the name)."""
    parts = urllib.parse.urlsplit(url)
    segments = [s for s in parts.path.split("/") if s]
    if not parts.hostname or not segments or any(s in (".", "..") for s in segments):
        raise ValueError(f"ckpt={url}: not a URL of a file; allowed: https://host/path/file")
    if parts.query:
        stem, dot, suffix = segments[-1].rpartition(".")
        tag = hashlib.sha256(parts.query.encode()).hexdigest()[:12]
        segments[-1] = f"{stem}-{tag}.{suffix}" if dot else f"{segments[-1]}-{tag}"
    return cache_root().joinpath(parts.hostname, *segments)


def download(url: str, timeout: float = 60.0) -> Path:
    """``url`` in the cache: downloaded on first use (atomically, size-checked, SHA-256 sidecar written), re-hashed
    against its sidecar on every later use. Returns the cached file's path."""
    path = url_cache_path(url)
    sidecar = path.with_name(path.name + ".sha256")
    if path.is_file():
        if not sidecar.is_file():
            raise DownloadError(f"{path} (cached from {url}) has no {sidecar.name} beside it, so it cannot be "
                                "verified; delete it to download it again, or write its SHA-256 into that file")
        _check_digest(path, sidecar.read_text().split()[0], f"{sidecar} (written at download)")
        return path
    try:
        response = urllib.request.urlopen(url, timeout=timeout)
    except (urllib.error.URLError, OSError) as error:
        raise DownloadError(f"could not download {url}: {getattr(error, 'reason', error)}. Without network, fetch "
                            f"it elsewhere and put it at {path} (then run again), or pass the local file as "
                            "ckpt=PATH") from None
    digest = hashlib.sha256()
    with response:
        expected = response.headers.get("Content-Length")

        def write(file) -> None:
            received = 0
            try:
                while chunk := response.read(_CHUNK):
                    file.write(chunk)
                    digest.update(chunk)
                    received += len(chunk)
            except (urllib.error.URLError, OSError) as error:  # includes http.client.IncompleteRead
                raise DownloadError(f"download of {url} broke off after {received} bytes: {error}; {path} is "
                                    "unchanged, run again") from None
            if expected is not None and received != int(expected):
                raise DownloadError(f"download of {url} got {received} bytes, the server announced {expected} "
                                    f"(Content-Length); {path} is unchanged, run again")

        atomic_write(path, write)
    atomic_write(sidecar, lambda file: file.write(f"{digest.hexdigest()}  {path.name}\n".encode()))
    return path


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _check_digest(path: Path, expected: str, origin: str) -> None:
    if path.is_dir():
        raise ValueError(f"sha256= checks one file; {path} is a folder (give the file, or drop sha256=)")
    actual = _file_digest(path)
    if actual != expected:
        raise DownloadError(f"{path}: SHA-256 {actual} does not match {expected} from {origin}; the file is "
                            "truncated or altered: delete it and download it again")


def _hub_download(spec: str) -> Path:
    """``org/name`` (the whole repository) or ``org/name/path/in/repo`` (one file) from the Hugging Face Hub."""
    parts = spec.strip("/").split("/")
    if len(parts) < 2 or not all(parts):
        raise ValueError(f"ckpt=hf://{spec}: not a Hub id; allowed: hf://org/name or hf://org/name/path/file")
    repo, filename = "/".join(parts[:2]), "/".join(parts[2:]) or None
    try:
        import huggingface_hub
    except ImportError:
        raise DownloadError(f"ckpt=hf://{spec} needs huggingface_hub (pip install 'lightning_diff[pretrained]' or "
                            f"pip install huggingface_hub), or download the repository elsewhere and pass its "
                            "folder as ckpt=PATH") from None
    cache = cache_root() / "hf"
    try:
        if filename is None:
            return Path(huggingface_hub.snapshot_download(repo, cache_dir=cache))
        return Path(huggingface_hub.hf_hub_download(repo, filename, cache_dir=cache))
    except Exception as error:  # offline mode, no network, unknown repository: one message for all
        command = f"huggingface-cli download {repo}" + (f" {filename}" if filename else "")
        target = cache / f"{repo.replace('/', '--')}" / (filename or "")
        raise DownloadError(f"could not fetch hf://{spec} from the Hugging Face Hub ({type(error).__name__}: "
                            f"{error}). Without network, run `{command} --local-dir {target}` where there is "
                            f"network, copy {target} here and pass ckpt={target}") from None

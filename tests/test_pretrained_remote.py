"""Remote sources (``lightning_diff.pretrained.remote``): downloaded once from a local HTTP server into the cache,
size- and digest-checked, reused offline; without network the error names the URL and where to put the file."""

import hashlib
import http.server
import socket
import threading

import pytest

from lightning_diff.pretrained import remote

PAYLOAD = bytes(range(256)) * 40  # 10 KiB


class _Handler(http.server.BaseHTTPRequestHandler):
    """``/file.pkl``: the payload; ``/short.pkl``: announces more bytes than it sends; counts requests."""

    requests: list = []

    def do_GET(self):
        type(self).requests.append(self.path)
        body = PAYLOAD
        self.send_response(200 if self.path.split("?")[0] in ("/edm/file.pkl", "/short.pkl") else 404)
        self.send_header("Content-Length", str(len(body) + (100 if self.path == "/short.pkl" else 0)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    _Handler.requests = []
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LIGHTNING_DIFF_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "pretrained"


def _refused_url() -> str:
    """A URL on a local port nothing listens on (connection refused: what no network looks like)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/edm/file.pkl"


def test_downloads_once_into_the_cache_with_a_digest(server, cache):
    url = f"{server}/edm/file.pkl"
    path = remote.resolve(url)
    assert path == cache / "127.0.0.1" / "edm" / "file.pkl"
    assert path.read_bytes() == PAYLOAD
    digest = hashlib.sha256(PAYLOAD).hexdigest()
    assert path.with_name("file.pkl.sha256").read_text().split()[0] == digest
    assert remote.resolve(url, sha256=digest) == path  # reused: no second request
    assert _Handler.requests == ["/edm/file.pkl"]
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]


def test_cached_file_is_verified_on_reuse(server, cache):
    url = f"{server}/edm/file.pkl"
    path = remote.resolve(url)
    path.write_bytes(PAYLOAD[:-1] + b"x")  # altered on disk
    with pytest.raises(remote.DownloadError,
                       match=r"does not match .* from .*file\.pkl\.sha256 \(written at download\).*delete it"):
        remote.resolve(url)


def test_known_digest_mismatch_is_refused(server):
    with pytest.raises(remote.DownloadError, match=r"does not match 0{64} from sha256=0{64}"):
        remote.resolve(f"{server}/edm/file.pkl", sha256="0" * 64)


def test_short_download_leaves_nothing_in_the_cache(server, cache):
    with pytest.raises(remote.DownloadError, match="short.pkl"):
        remote.resolve(f"{server}/short.pkl")
    assert not (cache / "127.0.0.1" / "short.pkl").exists()
    assert not list((cache / "127.0.0.1").glob("*.tmp"))


def test_offline_error_names_the_url_and_the_local_path(cache):
    url = _refused_url()
    with pytest.raises(remote.DownloadError) as error:
        remote.resolve(url)
    message = str(error.value)
    assert f"could not download {url}" in message
    assert f"put it at {cache / '127.0.0.1' / 'edm' / 'file.pkl'}" in message


def test_hub_offline_error_names_the_id_and_a_local_folder(monkeypatch):
    pytest.importorskip("huggingface_hub")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    with pytest.raises(remote.DownloadError, match=r"could not fetch hf://facebook/DiT-XL-2-256 .*huggingface-cli "
                                                   r"download facebook/DiT-XL-2-256 --local-dir .*pass ckpt="):
        remote.resolve("hf://facebook/DiT-XL-2-256")


def test_bare_org_name_is_a_local_path_with_a_hint(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="ckpt=facebook/DiT-XL-2-256: no such file or folder; for the Hugging "
                                                "Face Hub repository 'facebook/DiT-XL-2-256' write hf://"):
        remote.resolve("facebook/DiT-XL-2-256")

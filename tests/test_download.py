"""CIFAR on first use (memnas_jax.download): archives in the official binary format served from a
local HTTP server on 127.0.0.1. No test here, nor any other, reaches the internet (conftest points
the download URLs at a closed local port)."""

import hashlib
import http.server
import io
import os
import pathlib
import socket
import subprocess
import sys
import tarfile
import threading
import time

import numpy as np
import pytest
from helpers import ACCELERATOR  # tests/ is on sys.path (rootdir conftest)

from memnas_jax import data as data_lib
from memnas_jax import download

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def cifar_archive(kind: str, n_train: int, n_test: int, seed: int = 0):
    """A .tar.gz in the official binary layout, and the images / labels it holds (train, test)."""
    rng = np.random.default_rng(seed)
    spec = download.ARCHIVES[kind]
    classes = 10 if kind == "cifar10" else 100
    buffer, splits = io.BytesIO(), {}
    with tarfile.open(fileobj=buffer, mode="w:gz", compresslevel=1) as tar:
        for split, n in (("train", n_train), ("test", n_test)):
            images = rng.integers(0, 256, (n, 32, 32, 3), np.uint8)
            labels = rng.permutation(np.arange(n) % classes).astype(np.uint8)  # balanced
            splits[split] = (images, labels.astype(np.int32))
            chw = images.transpose(0, 3, 1, 2).reshape(n, -1)
            heads = [labels[:, None]] if spec.label_bytes == 1 else [labels[:, None] // 5,
                                                                     labels[:, None]]
            records = np.concatenate([*heads, chw], axis=1).astype(np.uint8)
            for member, part in zip(spec.members[split],
                                    np.array_split(records, len(spec.members[split]))):
                info = tarfile.TarInfo(member)
                info.size = part.nbytes
                tar.addfile(info, io.BytesIO(part.tobytes()))
    return buffer.getvalue(), splits


class Server:
    """A local HTTP server: path -> (body, declared length); counts the requests."""

    def __init__(self):
        self.files, self.requests = {}, []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's name)
                server.requests.append(self.path)
                body, length = server.files.get(self.path, (None, 0))
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(length))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_port}{path}"

    def serve(self, path: str, body: bytes, length: int | None = None) -> str:
        self.files[path] = (body, len(body) if length is None else length)
        return self.url(path)


@pytest.fixture
def server():
    s = Server()
    yield s
    s.httpd.shutdown()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.delenv("MEMNAS_DATA_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    return tmp_path / "xdg" / "memnas_jax" / "data"


def _point(monkeypatch, kind, url, body):
    prefix = f"MEMNAS_{kind.upper()}"
    monkeypatch.setenv(f"{prefix}_URL", url)
    monkeypatch.setenv(f"{prefix}_SHA256", hashlib.sha256(body).hexdigest())


def _cifar_config(**overrides):
    config = data_lib.default_data_config()
    config.update(dict(validation_size=0, tfds_data_dir="/nonexistent/tfds"))
    config.update(overrides)
    return config


@pytest.mark.parametrize("kind", ["cifar10", "cifar100"])
def test_download_checks_converts_and_caches(kind, server, cache, monkeypatch):
    body, splits = cifar_archive(kind, n_train=25, n_test=7)
    _point(monkeypatch, kind, server.serve(f"/{kind}.tar.gz", body), body)
    ds = data_lib.load_dataset(_cifar_config(name=kind))
    # Records are CHW; the loader's arrays are NHWC, pixel for pixel, with the (fine) labels.
    np.testing.assert_array_equal(ds.train.images, splits["train"][0])
    np.testing.assert_array_equal(ds.train.labels, splits["train"][1])
    np.testing.assert_array_equal(ds.test.images, splits["test"][0])
    np.testing.assert_array_equal(ds.test.labels, splits["test"][1])
    assert sorted(p.name for p in (cache / kind).iterdir()) == ["test.npz", "train.npz"]
    # Cached: the next load asks the server nothing.
    data_lib.load_dataset(_cifar_config(name=kind))
    assert len(server.requests) == 1


def test_corrupt_and_partial_downloads_are_removed_and_retried(server, cache, monkeypatch):
    body, splits = cifar_archive("cifar10", n_train=10, n_test=5)
    url = server.serve("/c10.tar.gz", b"x" + body[1:])  # one byte wrong
    _point(monkeypatch, "cifar10", url, body)
    with pytest.raises(data_lib.DatasetNotFoundError, match="SHA-256") as err:
        data_lib.load_dataset(_cifar_config())
    assert "it was deleted" in str(err.value) and "MEMNAS_DATA_DIR" in str(err.value)
    assert not list((cache / "cifar10").iterdir())
    # The server stops half-way through (declares more bytes than it sends).
    server.serve("/c10.tar.gz", body[:1000], length=len(body))
    with pytest.raises(data_lib.DatasetNotFoundError, match="could not download|stopped at"):
        data_lib.load_dataset(_cifar_config())
    assert not list((cache / "cifar10").iterdir())
    # A torn archive left in the cache (a killed run): deleted and reported, then downloaded.
    (cache / "cifar10" / "c10.tar.gz").write_bytes(body[:500])
    with pytest.raises(data_lib.DatasetNotFoundError, match="corrupt"):
        data_lib.load_dataset(_cifar_config())
    server.serve("/c10.tar.gz", body)
    ds = data_lib.load_dataset(_cifar_config())
    np.testing.assert_array_equal(ds.train.labels, splits["train"][1])


def test_no_network_fails_within_seconds_naming_the_offline_ways(cache, monkeypatch):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("MEMNAS_CIFAR10_URL", f"http://127.0.0.1:{port}/cifar-10-binary.tar.gz")
    start = time.perf_counter()
    with pytest.raises(data_lib.DatasetNotFoundError) as err:
        data_lib.load_dataset(_cifar_config())
    assert time.perf_counter() - start < 10
    message = str(err.value)
    assert "download failed" in message and "Connection refused" in message
    assert "MEMNAS_DATA_DIR" in message and "tfds build cifar10" in message
    # download=False: no attempt at all.
    with pytest.raises(data_lib.DatasetNotFoundError) as err:
        data_lib.load_dataset(_cifar_config(download=False))
    assert "download failed" not in str(err.value)


def test_read_records_layout():
    planes = np.repeat(np.array([10, 20, 30]), 1024)  # R, G, B planes of row-major 32 x 32
    planes[1] = 99  # red of pixel (row 0, column 1)
    record = np.concatenate([[7], planes]).astype(np.uint8)
    images, labels = download.read_records(record.tobytes(), 1)
    assert labels.tolist() == [7] and images.shape == (1, 32, 32, 3)
    assert images[0, 0, 1].tolist() == [99, 20, 30] and images[0, 1, 0].tolist() == [10, 20, 30]
    with pytest.raises(download.DownloadError, match="whole 3073-byte"):
        download.read_records(record.tobytes()[:-1], 1)


@pytest.mark.slow
def test_bare_search_command_downloads_and_starts_training(server, tmp_path):
    """What a new user runs: no flags but the work directory. The CPU default (the smoke preset)
    downloads CIFAR-10 (here from the local server) and starts training."""
    body, _ = cifar_archive("cifar10", n_train=8000, n_test=100)
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "xdg"),
               MEMNAS_CIFAR10_URL=server.serve("/cifar-10-binary.tar.gz", body),
               MEMNAS_CIFAR10_SHA256=hashlib.sha256(body).hexdigest())
    env.pop("MEMNAS_DATA_DIR", None)
    proc = subprocess.Popen(
        [sys.executable, str(REPO_ROOT / "experiments" / "cifar10_search.py"),
         f"--workdir={tmp_path / 'run'}"], env=env, stderr=subprocess.PIPE, text=True)
    seen = []
    try:
        for line in proc.stderr:
            seen.append(line)
            if "epoch 1/" in line:
                break
    finally:
        proc.kill()
        proc.wait()
    log = "".join(seen)
    assert "epoch 1/" in log, log[-3000:]
    assert f"preset auto: {'smoke' if ACCELERATOR == 'cpu' else 'gpu'}" in log
    assert (tmp_path / "xdg" / "memnas_jax" / "data" / "cifar10" / "train.npz").exists()
    assert server.requests == ["/cifar-10-binary.tar.gz"]

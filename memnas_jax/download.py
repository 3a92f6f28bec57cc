"""CIFAR-10 and CIFAR-100 on first use: the official archive, downloaded once, checked against a
pinned SHA-256, converted once to the `.npz` layout `memnas_jax.data` reads, then cached.

Source: the binary versions of the archives from the dataset's home page (`cifar-10-binary.tar.gz`,
`cifar-100-binary.tar.gz`: fixed-size records of label bytes and a 3,072-byte CHW image). They are
the archives TFDS itself downloads, with the checksums TFDS pins, and reading them needs no
`pickle`, so a tampered mirror cannot run code here (the "python" archives are pickles). TFDS
would need TensorFlow to prepare CIFAR; this needs numpy alone.

Where: `$MEMNAS_DATA_DIR/<name>/{train,test}.npz` when `MEMNAS_DATA_DIR` is set, else
`$XDG_CACHE_HOME/memnas_jax/data` (default `~/.cache/memnas_jax/data`). A mirror or a test server
replaces the URL and checksum with `MEMNAS_CIFAR10_URL` / `MEMNAS_CIFAR10_SHA256` (CIFAR-100:
`MEMNAS_CIFAR100_URL` / `MEMNAS_CIFAR100_SHA256`).

Failures: nothing is retried. An unreachable server fails within `timeout` seconds; a partial
download is deleted; a checksum mismatch deletes the file and says so, so the next run downloads
it again. Each raises `DownloadError` with a message that says what to do.
"""

from __future__ import annotations

import dataclasses
import hashlib
import http.client
import io as std_io
import os
import pathlib
import tarfile
import urllib.error
import urllib.request

import numpy as np

from memnas_jax.io import StorageError, atomic_write

DATA_DIR_ENV = "MEMNAS_DATA_DIR"
CHUNK = 1 << 20
IMAGE_BYTES = 32 * 32 * 3


class DownloadError(RuntimeError):
    """A dataset could not be downloaded or converted; the message says why and what to do."""


@dataclasses.dataclass(frozen=True)
class Archive:
    """An official CIFAR archive: where it is, its checksum, and its record layout."""

    name: str  # the dataset name: cifar10 or cifar100
    url: str
    sha256: str
    members: dict[str, tuple[str, ...]]  # split -> record files inside the archive
    label_bytes: int  # bytes before each image; the last is the label (CIFAR-100: coarse, fine)

    @property
    def env_prefix(self) -> str:
        return f"MEMNAS_{self.name.upper()}"


ARCHIVES = {
    "cifar10": Archive(
        "cifar10", "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz",
        "c4a38c50a1bc5f3a1c5537f2155ab9d68f9f25eb1ed8d9ddda3db29a59bca1dd",
        {"train": tuple(f"cifar-10-batches-bin/data_batch_{i}.bin" for i in range(1, 6)),
         "test": ("cifar-10-batches-bin/test_batch.bin",)}, label_bytes=1),
    "cifar100": Archive(
        "cifar100", "https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz",
        "58a81ae192c23a4be8b1804d68e518ed807d710a4eb253b1f2a199162a40d8ec",
        {"train": ("cifar-100-binary/train.bin",), "test": ("cifar-100-binary/test.bin",)},
        label_bytes=2),
}


def archive(name: str) -> Archive:
    """The archive of `name`, with the URL and checksum overridden from the environment."""
    if name not in ARCHIVES:
        raise ValueError(f"no download for dataset {name!r}; downloadable: {tuple(ARCHIVES)}")
    a = ARCHIVES[name]
    return dataclasses.replace(a, url=os.environ.get(f"{a.env_prefix}_URL") or a.url,
                               sha256=os.environ.get(f"{a.env_prefix}_SHA256") or a.sha256)


def cache_root() -> pathlib.Path:
    """Where downloaded datasets live: $MEMNAS_DATA_DIR, else the user cache folder."""
    if os.environ.get(DATA_DIR_ENV):
        return pathlib.Path(os.environ[DATA_DIR_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(base) / "memnas_jax" / "data"


def ensure_cifar(name: str, target: str | os.PathLike | None = None, *, timeout: float = 10.0,
                 progress: bool = True) -> pathlib.Path:
    """The folder `target` (default `cache_root()/name`) holding `name`'s train.npz and
    test.npz, downloading and converting the archive first when they are not there yet."""
    spec = archive(name)
    target = pathlib.Path(target) if target is not None else cache_root() / name
    if (target / "train.npz").exists() and (target / "test.npz").exists():
        return target
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DownloadError(f"cannot create {target} for the {name} download ({e}); set "
                            f"{DATA_DIR_ENV} to a writable folder") from None
    path = target / pathlib.PurePosixPath(spec.url).name
    if path.exists() and _sha256(path) != spec.sha256:
        path.unlink()
        raise DownloadError(f"{path} is corrupt (SHA-256 is not {spec.sha256}); it was deleted: "
                            "run again to download it anew")
    if not path.exists():
        download(spec.url, path, spec.sha256, timeout=timeout, progress=progress)
    convert(spec, path, target)
    path.unlink()  # the .npz files are the cache; the archive is not needed again
    return target


def download(url: str, path: pathlib.Path, sha256: str, *, timeout: float = 10.0,
             progress: bool = True) -> None:
    """Streams `url` to `path` (through `path.part`, hashed on the way); nothing is left behind
    on failure. Raises DownloadError."""
    part = path.with_name(path.name + ".part")
    digest = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(part, "wb") as f:
            total = int(response.headers.get("Content-Length") or 0) or None
            from tqdm.auto import tqdm
            with tqdm(total=total, unit="B", unit_scale=True, disable=not progress,
                      desc=f"downloading {path.name}") as bar:
                while chunk := response.read(CHUNK):
                    f.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
            if total is not None and f.tell() != total:
                raise DownloadError(f"the download of {url} stopped at {f.tell():,} of "
                                    f"{total:,} bytes; run again to retry")
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as e:
        part.unlink(missing_ok=True)
        reason = getattr(e, "reason", None) or e
        raise DownloadError(f"could not download {url}: {reason}") from None
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    if digest.hexdigest() != sha256:
        part.unlink()
        raise DownloadError(f"{url} gave a file whose SHA-256 is {digest.hexdigest()}, not the "
                            f"pinned {sha256}; it was deleted. Run again to retry; for a mirror, "
                            "set the URL and checksum variables of memnas_jax.download")
    os.replace(part, path)


def _sha256(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def read_records(data: bytes, label_bytes: int) -> tuple[np.ndarray, np.ndarray]:
    """Binary CIFAR records -> (uint8 NHWC images, int32 labels)."""
    size = label_bytes + IMAGE_BYTES
    if len(data) % size:
        raise DownloadError(f"{len(data)} bytes are not whole {size}-byte CIFAR records")
    records = np.frombuffer(data, np.uint8).reshape(-1, size)
    images = records[:, label_bytes:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), records[:, label_bytes - 1].astype(np.int32)


def convert(spec: Archive, path: pathlib.Path, target: pathlib.Path) -> None:
    """Writes target/{train,test}.npz (arrays `image`, `label`) from the archive at `path`,
    each atomically; test.npz last, so that its presence means the conversion finished."""
    try:
        with tarfile.open(path, "r:gz") as tar:
            for split in ("train", "test"):
                parts = []
                for member in spec.members[split]:
                    f = tar.extractfile(member)
                    if f is None:
                        raise KeyError(member)
                    parts.append(read_records(f.read(), spec.label_bytes))
                buffer = std_io.BytesIO()
                np.savez(buffer, image=np.concatenate([p[0] for p in parts]),
                         label=np.concatenate([p[1] for p in parts]))
                atomic_write(target / f"{split}.npz", buffer.getvalue())
    except StorageError:  # the disk, not the archive: keep it
        raise
    except (tarfile.TarError, KeyError, EOFError, OSError) as e:
        path.unlink(missing_ok=True)
        raise DownloadError(f"{path} is not a readable {spec.name} archive ({type(e).__name__}: "
                            f"{e}); it was deleted: run again to download it anew") from None


__all__ = ["ARCHIVES", "Archive", "DownloadError", "archive", "cache_root", "convert",
           "download", "ensure_cifar", "read_records"]

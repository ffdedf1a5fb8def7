"""Fashion-MNIST: find, verify, download and load the original IDX .gz files.

The files are looked for in this order: an explicit path, `$MINIDIFFUSION_DATA`,
Debian's `/usr/share/datasets/fashion-mnist/` (package `dataset-fashion-mnist`),
then the user cache `$XDG_CACHE_HOME/minidiffusion/fashion-mnist` (default
`~/.cache/...`), which `download_fashion_mnist` fills from the official mirror.

Checksums: `SHA256` holds the SHA-256 of the four files exactly as the official
mirror serves them. Debian's copies hold the same IDX data but were re-gzipped
(no stored file name, a 2020 timestamp), so their bytes and hashes differ; a
found directory is therefore parsed and checked for shape, not hashed.
Loading a split means inflating its gzip files each time (no module-level cache is kept):
callers that reload often hold the tensors themselves.
"""

from __future__ import annotations

import gzip
import os
import urllib.error
import urllib.request
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError, DataError, OutputError
from ..paths import atomic_write, cache_dir, sha256_file
from .images import pad_to as _pad_images
from .loaders import DataLoaders, uint8_loaders

__all__ = ["CLASSES", "FILES", "SHA256", "OFFICIAL_URL", "DEBIAN_DIR", "ENV_VAR", "cache_dir", "read_idx",
           "find_fashion_mnist", "load_fashion_mnist", "fashion_mnist_loaders",
           "verify_sha256", "download_fashion_mnist"]

CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
           "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
SHA256 = {  # the official files (zalandoresearch/fashion-mnist, as served by OFFICIAL_URL)
    "train-images-idx3-ubyte.gz": "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
    "train-labels-idx1-ubyte.gz": "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
    "t10k-images-idx3-ubyte.gz": "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
    "t10k-labels-idx1-ubyte.gz": "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
}
OFFICIAL_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
ENV_VAR = "MINIDIFFUSION_DATA"
_IDX_MAGIC = {0x00000801: 1, 0x00000803: 3}  # uint8 labels [N], uint8 images [N, H, W]
_HOW_TO_GET = ("install it with `apt-get install dataset-fashion-mnist`, download it into the cache with "
               f"`minidiffusion data fashion-mnist`, or set {ENV_VAR} / pass a path to a folder holding "
               "the four .gz files")
_REFETCH = "get a fresh copy (`minidiffusion data fashion-mnist` or `apt-get install dataset-fashion-mnist`)"


# -- reading ----------------------------------------------------------------------------------
def read_idx(path: str | Path) -> torch.Tensor:
    """Return the uint8 array (0..255) in a gzip-compressed IDX file: labels [N] or images [N, H, W]."""
    path = Path(path)
    try:
        raw = gzip.decompress(path.read_bytes())
    except FileNotFoundError:
        raise DataError(f"{path} does not exist; {_HOW_TO_GET}") from None
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path} is not a complete gzip file ({e}); delete it and {_REFETCH}") from e
    magic = int.from_bytes(raw[:4], "big") if len(raw) >= 4 else None
    ndim = _IDX_MAGIC.get(magic)
    if ndim is None:
        found = "no header" if magic is None else f"magic number 0x{magic:08x}"
        raise DataError(f"{path} is not a uint8 IDX file ({found}, expected 0x00000801 for labels or "
                        f"0x00000803 for images); {_REFETCH}")
    head = 4 + 4 * ndim
    if len(raw) < head:
        raise DataError(f"{path} has a truncated IDX header ({len(raw)} bytes); {_REFETCH}")
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    if len(raw) - head != int(np.prod(dims)):
        raise DataError(f"{path} header promises {'x'.join(map(str, dims))} = {int(np.prod(dims))} bytes "
                        f"but holds {len(raw) - head}; the file is damaged, {_REFETCH}")
    # copy(): frombuffer views the immutable bytes, and tensors must be writable
    return torch.from_numpy(np.frombuffer(raw, dtype=np.uint8, offset=head).reshape(dims).copy())


def find_fashion_mnist(path: str | Path | None = None, split: str | None = None) -> Path:
    """Return the folder holding the Fashion-MNIST .gz files of `split` (both splits when None).

    Looks in `path`, else `$MINIDIFFUSION_DATA` (either may be the folder itself or
    hold a `fashion-mnist/` sub-folder), else Debian's folder, else the cache. A
    given path or env var that lacks the files is an error, never skipped.
    """
    names = [n for s in ([split] if split else FILES) for n in FILES[_check_split(s)]]
    given = path if path is not None else os.environ.get(ENV_VAR) or None
    if given is None:
        candidates = [DEBIAN_DIR, cache_dir("fashion-mnist")]
    else:
        candidates = [Path(given).expanduser(), Path(given).expanduser() / "fashion-mnist"]
    for folder in candidates:
        if all((folder / n).is_file() for n in names):
            return folder
    if given is None:
        raise DataError(f"Fashion-MNIST was found neither in {candidates[0]} nor in {candidates[1]}; "
                        f"{_HOW_TO_GET}")
    how = "the path you gave" if path is not None else f"${ENV_VAR}"
    missing = [n for n in names if not (candidates[0] / n).is_file()]
    raise DataError(f"Fashion-MNIST file(s) {', '.join(missing)} not found in {candidates[0]} ({how}); "
                    f"point {how} at the folder holding the four .gz files, or drop it and get them with "
                    "`apt-get install dataset-fashion-mnist` or `minidiffusion data fashion-mnist`")


def _check_split(split: str) -> str:
    if split not in FILES:
        raise ConfigError(f"unknown Fashion-MNIST split {split!r}; use 'train' or 'test'")
    return split


def load_fashion_mnist(split: str = "train", path: str | Path | None = None,
                       pad_to: int | None = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (images uint8 [N, 1, pad_to, pad_to] in 0..255 with a 0 border, labels int64 [N] in 0..9).

    `pad_to=None` (or 28) keeps the original 28x28 images.
    """
    folder = find_fashion_mnist(path, _check_split(split))
    if pad_to is not None and pad_to < 28:
        raise ConfigError(f"pad_to={pad_to} is smaller than the 28x28 Fashion-MNIST images; use 28 or more")
    img_file, lbl_file = (folder / n for n in FILES[split])
    images, labels = read_idx(img_file), read_idx(lbl_file)
    if images.ndim != 3 or tuple(images.shape[1:]) != (28, 28):
        raise DataError(f"{img_file} holds arrays of shape {tuple(images.shape)}, not 28x28 images; "
                        "check that the images and labels files are not swapped or replaced")
    if labels.ndim != 1 or (len(labels) and int(labels.max()) >= len(CLASSES)):
        raise DataError(f"{lbl_file} does not hold labels 0..9; check that it is the original labels file")
    if len(images) != len(labels):
        raise DataError(f"{img_file} has {len(images)} images but {lbl_file} has {len(labels)} labels; "
                        f"the two files come from different copies, {_REFETCH}")
    images = images.unsqueeze(1)
    if pad_to is not None and pad_to > 28:
        images = _pad_images(images, pad_to, value=0)
    return images, labels.long()


# -- batching ---------------------------------------------------------------------------------
def fashion_mnist_loaders(batch_size: int = 256, path: str | Path | None = None, seed: int = 0,
                          valid_batch_size: int | None = None, pad_to: int | None = 32,
                          train_limit: int | None = None, valid_limit: int | None = None) -> DataLoaders:
    """Return train (shuffled) / test loaders of (images float32 [B,1,32,32] in [-1, 1], labels int64 [B]).

    `train_limit` / `valid_limit` keep only the first N images of each split (quick tries, tests,
    and cheap validation of diffusion models whose loss is an estimate anyway).
    """
    train = load_fashion_mnist("train", path, pad_to)
    test = load_fashion_mnist("test", path, pad_to)
    train = tuple(t[:train_limit] for t in train) if train_limit else train
    test = tuple(t[:valid_limit] for t in test) if valid_limit else test
    return uint8_loaders(train, test, batch_size, seed=seed, valid_batch_size=valid_batch_size)


# -- downloading ------------------------------------------------------------------------------
def verify_sha256(path: str | Path, expected: str, name: str | None = None) -> None:
    """Return None if the file's SHA-256 equals `expected` (hex); raise DataError naming both hashes if not.

    `name` is how the message names the file (default: its path).
    """
    actual = sha256_file(Path(path))
    if actual != expected.lower():
        raise DataError(f"{name or path} has SHA-256 {actual} but {expected.lower()} was expected; "
                        "the file is corrupt or altered, delete it and download it again")


def download_fashion_mnist(dest: str | Path | None = None, base_url: str = OFFICIAL_URL, *,
                           opener: Callable = urllib.request.urlopen, checksums: dict[str, str] | None = None,
                           timeout: float = 60.0) -> Path:
    """Download the four Fashion-MNIST files into `dest` (default: the cache); return that folder.

    Files already there with the right SHA-256 are kept. Each download goes to a
    temporary name in `dest`, is verified against `checksums` (default: the
    official `SHA256`) and only then renamed into place, so a broken or altered
    download never replaces a file. `opener(url, timeout=...)` is urllib's by default.
    """
    dest = Path(dest) if dest is not None else cache_dir("fashion-mnist")
    checksums = checksums or SHA256
    created = not dest.exists()
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create the download folder {dest} ({e.strerror or e}); choose another --dest") \
            from None
    try:
        _download_all(dest, base_url, opener, checksums, timeout)
    except DataError:
        if created and not any(dest.iterdir()):
            dest.rmdir()  # leave nothing behind that this call made
        raise
    return dest


def _download_all(dest: Path, base_url: str, opener: Callable, checksums: dict[str, str], timeout: float) -> None:
    for name in (n for pair in FILES.values() for n in pair):
        target = dest / name
        if target.is_file() and sha256_file(target) == checksums[name]:
            continue
        url = base_url.rstrip("/") + "/" + name
        with atomic_write(target) as tmp:  # renamed into place only once downloaded and verified
            try:
                with opener(url, timeout=timeout) as resp, open(tmp, "wb") as f:
                    for chunk in iter(lambda r=resp: r.read(1 << 20), b""):
                        f.write(chunk)
            except (urllib.error.URLError, OSError) as e:
                raise DataError(f"could not download {url} ({getattr(e, 'reason', e)}); check the network "
                                "connection, or install `apt-get install dataset-fashion-mnist`") from e
            verify_sha256(tmp, checksums[name], name=f"{name} downloaded from {url}")

"""Fashion-MNIST: IDX parsing and its errors, search order, download verification, loading, loaders."""

from __future__ import annotations

import gzip
import hashlib
import re
import shutil
import struct
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch

from minidiffusion.data import fashion_mnist as fm
from minidiffusion.errors import ConfigError, DataError

ALL_FILES = [n for pair in fm.FILES.values() for n in pair]


def idx_bytes(arr: np.ndarray, magic: int | None = None) -> bytes:
    """Raw IDX bytes for a uint8 array (magic 0x0801 / 0x0803 from its rank unless given)."""
    magic = magic if magic is not None else 0x800 | arr.ndim
    return struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in arr.shape) + arr.tobytes()


def write_gz(path: Path, raw: bytes) -> Path:
    path.write_bytes(gzip.compress(raw))
    return path


def make_dataset(folder: Path, n_train: int = 12, n_test: int = 5, seed: int = 0) -> Path:
    """Write the four files of a tiny fake Fashion-MNIST into `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("test", n_test)):
        img_name, lbl_name = fm.FILES[split]
        write_gz(folder / img_name, idx_bytes(rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)))
        write_gz(folder / lbl_name, idx_bytes(np.arange(n, dtype=np.uint8) % 10))
    return folder


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def nowhere(tmp_path, monkeypatch):
    """Point every default location at empty folders; return them as (debian, cache)."""
    debian, cache = tmp_path / "debian", tmp_path / "xdg"
    monkeypatch.delenv(fm.ENV_VAR, raising=False)
    monkeypatch.setattr(fm, "DEBIAN_DIR", debian)
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    return debian, cache / "minidiffusion" / "fashion-mnist"


# -- read_idx -----------------------------------------------------------------------------------
def test_read_idx_images_and_labels(tmp_path):
    imgs = np.random.default_rng(0).integers(0, 256, (3, 28, 28), dtype=np.uint8)
    x = fm.read_idx(write_gz(tmp_path / "i.gz", idx_bytes(imgs)))
    y = fm.read_idx(write_gz(tmp_path / "l.gz", idx_bytes(np.array([9, 0, 4], np.uint8))))
    assert x.dtype == torch.uint8 and x.shape == (3, 28, 28) and np.array_equal(x.numpy(), imgs)
    assert y.tolist() == [9, 0, 4]
    x[0, 0, 0] = 1  # writable, no aliasing of immutable bytes


@pytest.mark.parametrize("kind", ["truncated gzip", "garbage", "wrong magic", "short header",
                                  "payload short", "payload long", "empty"])
def test_read_idx_broken_files_name_the_file(tmp_path, kind):
    good = idx_bytes(np.zeros((4, 28, 28), np.uint8))
    path = tmp_path / f"broken-{kind.replace(' ', '-')}.gz"
    if kind == "truncated gzip":
        path.write_bytes(gzip.compress(good)[:-20])
    elif kind == "garbage":
        path.write_bytes(b"this is not a gzip file at all" * 10)
    elif kind == "empty":
        path.write_bytes(b"")
    else:
        raw = {"wrong magic": idx_bytes(np.zeros((4, 28, 28), np.uint8), magic=0x0D03),
               "short header": good[:9],
               "payload short": good[:-5],
               "payload long": good + b"\0\0"}[kind]
        write_gz(path, raw)
    with pytest.raises(DataError, match=re.escape(str(path))) as e:
        fm.read_idx(path)
    assert "\n" not in str(e.value)


def test_read_idx_missing_file(tmp_path):
    with pytest.raises(DataError, match="does not exist.*apt-get install dataset-fashion-mnist"):
        fm.read_idx(tmp_path / "nope.gz")


# -- search order -------------------------------------------------------------------------------
def test_search_order_explicit_env_debian_cache(tmp_path, monkeypatch, nowhere):
    debian, cache = nowhere
    explicit, env = make_dataset(tmp_path / "explicit"), make_dataset(tmp_path / "env")
    make_dataset(debian)
    make_dataset(cache)
    monkeypatch.setenv(fm.ENV_VAR, str(env))
    assert fm.find_fashion_mnist(explicit) == explicit
    assert fm.find_fashion_mnist() == env
    monkeypatch.delenv(fm.ENV_VAR)
    assert fm.find_fashion_mnist() == debian
    shutil.rmtree(debian)
    assert fm.find_fashion_mnist() == cache


def test_given_root_may_hold_a_fashion_mnist_subfolder(tmp_path, nowhere):
    make_dataset(tmp_path / "data" / "fashion-mnist")
    assert fm.find_fashion_mnist(tmp_path / "data") == tmp_path / "data" / "fashion-mnist"


def test_explicit_path_without_files_errors_instead_of_falling_back(tmp_path, monkeypatch, nowhere):
    debian, _ = nowhere
    make_dataset(debian)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"not found in .*empty \(the path you gave\)"):
        fm.find_fashion_mnist(tmp_path / "empty")
    monkeypatch.setenv(fm.ENV_VAR, str(tmp_path / "empty"))
    with pytest.raises(DataError, match=r"\$MINIDIFFUSION_DATA"):
        fm.find_fashion_mnist()


def test_split_only_needs_its_own_files(tmp_path, nowhere):
    folder = make_dataset(tmp_path / "d")
    (folder / fm.FILES["train"][0]).unlink()
    assert fm.find_fashion_mnist(folder, "test") == folder
    with pytest.raises(DataError, match=fm.FILES["train"][0]):
        fm.find_fashion_mnist(folder, "train")


def test_missing_everywhere_names_the_three_ways(nowhere):
    with pytest.raises(DataError) as e:
        fm.find_fashion_mnist()
    msg = str(e.value)
    for hint in ("apt-get install dataset-fashion-mnist", "minidiffusion data fashion-mnist", fm.ENV_VAR,
                 str(nowhere[0]), str(nowhere[1])):
        assert hint in msg


def test_cache_respects_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert fm.cache_dir("fashion-mnist") == tmp_path / "minidiffusion" / "fashion-mnist"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert fm.cache_dir() == Path.home() / ".cache" / "minidiffusion"


# -- loading ------------------------------------------------------------------------------------
def test_load_pads_with_zero_and_keeps_pixels(tmp_path, nowhere):
    folder = make_dataset(tmp_path / "d", n_train=12)
    raw = fm.read_idx(folder / fm.FILES["train"][0])
    x, y = fm.load_fashion_mnist("train", folder)
    assert x.shape == (12, 1, 32, 32) and x.dtype == torch.uint8
    assert y.dtype == torch.int64 and y.tolist() == [i % 10 for i in range(12)]
    assert torch.equal(x[:, 0, 2:30, 2:30], raw)
    border = x.clone()
    border[:, :, 2:30, 2:30] = 0
    assert border.sum() == 0
    x28, _ = fm.load_fashion_mnist("train", folder, pad_to=None)
    assert torch.equal(x28[:, 0], raw)


def test_load_count_mismatch_and_bad_args(tmp_path, nowhere):
    folder = make_dataset(tmp_path / "d")
    write_gz(folder / fm.FILES["test"][1], idx_bytes(np.zeros(4, np.uint8)))
    with pytest.raises(DataError, match="5 images but .* has 4 labels"):
        fm.load_fashion_mnist("test", folder)
    with pytest.raises(ConfigError, match="split"):
        fm.load_fashion_mnist("valid", folder)
    with pytest.raises(ConfigError, match="pad_to"):
        fm.load_fashion_mnist("train", folder, pad_to=16)


def test_load_swapped_files(tmp_path, nowhere):
    folder = make_dataset(tmp_path / "d")
    img, lbl = (folder / n for n in fm.FILES["train"])
    img.rename(tmp_path / "tmp")
    lbl.rename(img)
    (tmp_path / "tmp").rename(lbl)
    with pytest.raises(DataError, match="not 28x28 images"):
        fm.load_fashion_mnist("train", folder)


def test_loaders_yield_float_batches(tmp_path, nowhere):
    folder = make_dataset(tmp_path / "d", n_train=12, n_test=5)
    dls = fm.fashion_mnist_loaders(batch_size=5, path=folder, seed=3)
    batches = list(dls.train)
    assert [len(b[0]) for b in batches] == [5, 5, 2]
    xb, yb = batches[0]
    assert xb.dtype == torch.float32 and xb.shape == (5, 1, 32, 32) and yb.dtype == torch.int64
    assert xb.min() >= -1 and xb.max() <= 1 and (xb[:, :, 0] == -1).all()
    assert sorted(torch.cat([b[1] for b in batches]).tolist()) == sorted(i % 10 for i in range(12))
    assert [b[1].tolist() for b in dls.valid] == [[0, 1, 2, 3, 4]]  # valid = test split, in order, 2*bs


# -- download -----------------------------------------------------------------------------------
def serve(folder: Path) -> str:
    return folder.resolve().as_uri() + "/"


def test_download_verifies_and_installs(tmp_path):
    mirror = make_dataset(tmp_path / "mirror")
    sums = {n: sha256(mirror / n) for n in ALL_FILES}
    dest = fm.download_fashion_mnist(tmp_path / "dest", serve(mirror), checksums=sums)
    assert sorted(p.name for p in dest.iterdir()) == sorted(ALL_FILES)  # no temp files left
    assert all((dest / n).read_bytes() == (mirror / n).read_bytes() for n in ALL_FILES)
    assert fm.load_fashion_mnist("train", dest)[0].shape == (12, 1, 32, 32)

    def no_network(url, timeout):
        raise AssertionError("files already verified must not be downloaded again")
    assert fm.download_fashion_mnist(dest, "http://unused/", opener=no_network, checksums=sums) == dest


def test_download_default_dest_is_the_cache(tmp_path, nowhere):
    mirror = make_dataset(tmp_path / "mirror")
    sums = {n: sha256(mirror / n) for n in ALL_FILES}
    dest = fm.download_fashion_mnist(base_url=serve(mirror), checksums=sums)
    assert dest == nowhere[1] and fm.find_fashion_mnist() == dest


def test_download_bad_checksum_keeps_nothing(tmp_path):
    mirror = make_dataset(tmp_path / "mirror")
    sums = {n: sha256(mirror / n) for n in ALL_FILES}
    bad = mirror / fm.FILES["train"][0]
    bad.write_bytes(bad.read_bytes()[:-1] + b"X")  # corrupted on the "server"
    dest = tmp_path / "dest"
    with pytest.raises(DataError) as e:
        fm.download_fashion_mnist(dest, serve(mirror), checksums=sums)
    msg = str(e.value)
    assert bad.name in msg and sums[bad.name] in msg and sha256(bad) in msg
    assert not (dest / bad.name).exists() and not list(dest.glob(".*part"))


def test_download_network_error(tmp_path):
    def offline(url, timeout):
        raise urllib.error.URLError("Name or service not known")
    with pytest.raises(DataError, match="could not download http://mirror.invalid/train-images.*not known"):
        fm.download_fashion_mnist(tmp_path, "http://mirror.invalid", opener=offline)
    with pytest.raises(DataError, match="could not download"):  # a missing file on the mirror
        fm.download_fashion_mnist(tmp_path / "d", serve(tmp_path / "empty-mirror"))


def test_download_defaults_to_official_checksums(tmp_path):
    mirror = make_dataset(tmp_path / "mirror")  # fake files cannot match the official hashes
    with pytest.raises(DataError, match=fm.SHA256[fm.FILES["train"][0]]):
        fm.download_fashion_mnist(tmp_path / "dest", serve(mirror))


def test_verify_sha256(tmp_path):
    f = tmp_path / "f"
    f.write_bytes(b"abc")
    good = hashlib.sha256(b"abc").hexdigest()
    fm.verify_sha256(f, good.upper())
    with pytest.raises(DataError, match=f"{f} has SHA-256 {good} but 0+ was expected"):
        fm.verify_sha256(f, "0" * 64)


def test_constants():
    assert len(fm.CLASSES) == 10 and fm.CLASSES[0] == "T-shirt/top" and fm.CLASSES[9] == "Ankle boot"
    assert set(fm.SHA256) == set(ALL_FILES) and all(len(h) == 64 for h in fm.SHA256.values())


# -- the real data ------------------------------------------------------------------------------
@pytest.mark.integration
def test_real_data_counts_and_padding(fashion_mnist_data):
    for split, n in (("train", 60_000), ("test", 10_000)):
        x, y = fashion_mnist_data[split]
        assert x.shape == (n, 1, 32, 32) and x.dtype == torch.uint8 and y.dtype == torch.int64
        assert torch.bincount(y, minlength=10).tolist() == [n // 10] * 10
        assert int(x[:, :, :2].max()) == int(x[:, :, -2:].max()) == 0
        assert int(x[..., :2].max()) == int(x[..., -2:].max()) == 0
        assert int(x.max()) == 255  # real pixels span the full range


@pytest.mark.integration
def test_real_data_download_path(fashion_mnist_dir, tmp_path):
    """The real files go through the download code (file:// mirror) and load identically."""
    sums = {n: sha256(fashion_mnist_dir / n) for n in fm.FILES["test"]}
    sums.update({n: sha256(fashion_mnist_dir / n) for n in fm.FILES["train"]})
    dest = tmp_path / "dest"
    dest.mkdir()
    for n in fm.FILES["train"]:  # pre-seed the big files so only the test split is "downloaded"
        (dest / n).symlink_to(fashion_mnist_dir / n)
    fm.download_fashion_mnist(dest, serve(fashion_mnist_dir), checksums=sums)
    x, y = fm.load_fashion_mnist("test", dest)
    assert x.shape == (10_000, 1, 32, 32) and torch.bincount(y).tolist() == [1000] * 10


@pytest.mark.integration
def test_real_loaders(fashion_mnist_dir):
    dls = fm.fashion_mnist_loaders(batch_size=512, path=fashion_mnist_dir)
    xb, yb = next(iter(dls.train))
    assert xb.shape == (512, 1, 32, 32) and xb.dtype == torch.float32 and yb.shape == (512,)
    assert float(xb.min()) == -1.0 and float(xb.max()) <= 1.0 and float(xb.max()) > 0.9
    assert len(dls.train) == 118 and len(dls.valid) == 10

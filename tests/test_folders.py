"""Image folders: discovery, classes, decoding to uint8 squares, skipping bad files, the safetensors cache."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from minidiffusion.data import folders
from minidiffusion.errors import ConfigError, DataError


@pytest.fixture(autouse=True)
def cache_home(tmp_path, monkeypatch) -> Path:
    """Every test gets its own cache; returns the folder the decoded tensors go to."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    return tmp_path / "xdg" / "minidiffusion" / "folders"


def save(path: Path, value, size=(40, 24), mode="L") -> Path:
    """Write a solid-colour image (format from the suffix)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value).save(path)
    return path


@pytest.fixture
def classes(tmp_path) -> Path:
    """root/boots: 2 gray PNGs (one nested deeper); root/shirts: 1 RGB JPEG, 1 gray .PNG (upper case)."""
    root = tmp_path / "classes"
    save(root / "boots" / "a.png", 10)
    save(root / "boots" / "deep" / "b.png", 20)
    save(root / "shirts" / "c.JPEG", (200, 0, 0), mode="RGB")
    save(root / "shirts" / "d.PNG", 100)
    (root / "shirts" / "notes.txt").write_text("not an image")
    return root


def test_class_subfolders_rgb_when_any_image_is_colour(classes):
    x, y, names = folders.load_image_folder(classes, 16)
    assert names == ["boots", "shirts"]
    assert x.shape == (4, 3, 16, 16) and x.dtype == torch.uint8
    assert y.dtype == torch.int64 and y.tolist() == [0, 0, 1, 1]
    assert x[0].unique().tolist() == [10]  # gray images repeated into 3 identical channels
    red = x[2].float().mean(dim=(1, 2))
    assert red[0] > 190 and red[1] < 10 and red[2] < 10  # JPEG is lossy, but stays red


def test_flat_grayscale_folder_has_no_labels(tmp_path):
    for i in range(3):
        save(tmp_path / "flat" / f"{i}.png", 50 * i)
    x, y, names = folders.load_image_folder(tmp_path / "flat", 8)
    assert x.shape == (3, 1, 8, 8) and y is None and names is None
    assert [int(v) for v in x.view(3, -1).float().mean(1)] == [0, 50, 100]


def test_forced_channels(classes):
    assert folders.load_image_folder(classes, 8, channels=1)[0].shape == (4, 1, 8, 8)
    assert folders.load_image_folder(classes, 8, channels=3)[0].shape == (4, 3, 8, 8)
    with pytest.raises(ConfigError, match="channels"):
        folders.load_image_folder(classes, 8, channels=2)


def test_centre_crop_then_resize(tmp_path):
    """A wide image keeps its middle square: left/right thirds are cut away."""
    arr = np.zeros((30, 90), np.uint8)
    arr[:, 30:60] = 255
    Image.fromarray(arr).save(tmp_path / "wide.png")
    x, _, _ = folders.load_image_folder(tmp_path, 10)
    assert x.shape == (1, 1, 10, 10) and x.min() > 200  # (Lanczos blurs the edges a little)


def test_sixteen_bit_png_is_scaled_not_clipped(tmp_path):
    Image.fromarray(np.full((8, 8), 32896, np.uint16)).save(tmp_path / "a.png")  # 32896 / 257 = 128
    x, _, _ = folders.load_image_folder(tmp_path, 4)
    assert x.unique().tolist() == [128]


def test_transparent_pixels_become_white(tmp_path):
    Image.new("RGBA", (8, 8), (255, 0, 0, 0)).save(tmp_path / "clear.png")
    assert folders.load_image_folder(tmp_path, 4)[0].unique().tolist() == [255]


def test_corrupt_file_is_skipped_with_a_warning(classes):
    bad = classes / "boots" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.warns(UserWarning, match=f"skipping unreadable image {bad}"):
        x, y, _ = folders.load_image_folder(classes, 8)
    assert len(x) == 4 and y.tolist() == [0, 0, 1, 1]
    with pytest.warns(UserWarning, match="broken.png"):  # the cached result warns again
        assert len(folders.load_image_folder(classes, 8)[0]) == 4


def test_loose_images_beside_class_folders_are_ignored_with_a_warning(classes):
    save(classes / "stray.png", 0)
    with pytest.warns(UserWarning, match="ignoring 1 image"):
        assert len(folders.load_image_folder(classes, 8)[0]) == 4


def test_hidden_files_are_ignored(tmp_path):
    save(tmp_path / "a.png", 1)
    save(tmp_path / ".ipynb_checkpoints" / "a.png", 2)
    (tmp_path / "._a.png").write_bytes(b"macOS resource fork")
    assert folders.load_image_folder(tmp_path, 4)[1] is None  # no class from the hidden folder


def test_empty_missing_and_unreadable_folders_raise(tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(DataError, match="no .png/.jpg/.jpeg images found in .*empty"):
        folders.load_image_folder(tmp_path / "empty", 8)
    with pytest.raises(DataError, match="does not exist"):
        folders.load_image_folder(tmp_path / "missing", 8)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.jpg").write_bytes(b"not a jpeg")
    with pytest.warns(UserWarning), pytest.raises(DataError, match="none of the 1 images"):
        folders.load_image_folder(tmp_path / "bad", 8)


def test_cache_hit_and_invalidation(classes, cache_home, monkeypatch):
    x1, y1, _ = folders.load_image_folder(classes, 8)
    assert len(list(cache_home.glob("*.safetensors"))) == 1

    def must_not_decode(*args):
        raise AssertionError("a cache hit must not decode")
    with monkeypatch.context() as m:
        m.setattr(folders, "_decode_all", must_not_decode)
        x2, y2, names = folders.load_image_folder(classes, 8)
    assert torch.equal(x1, x2) and torch.equal(y1, y2) and names == ["boots", "shirts"]

    changed = save(classes / "boots" / "a.png", 200)  # same size on disk is possible: bump mtime too
    os.utime(changed, ns=(1, changed.stat().st_mtime_ns + 10**9))
    x3, _, _ = folders.load_image_folder(classes, 8)
    assert x3[0].unique().tolist() == [200]
    assert folders.load_image_folder(classes, 4)[0].shape[-1] == 4  # another size is another entry
    assert len(list(cache_home.glob("*.safetensors"))) == 3


def test_no_cache_and_damaged_cache(classes, cache_home):
    folders.load_image_folder(classes, 8, cache=False)
    assert not cache_home.exists()
    x1 = folders.load_image_folder(classes, 8)[0]
    (entry,) = cache_home.glob("*.safetensors")
    entry.write_bytes(b"truncated")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a damaged cache is silently rebuilt
        assert torch.equal(folders.load_image_folder(classes, 8)[0], x1)
    assert entry.stat().st_size > 100


def test_loaders_hold_out_a_deterministic_validation_set(tmp_path):
    for c in ("a", "b"):
        for i in range(10):
            save(tmp_path / "d" / c / f"{i}.png", 10 * i + (100 if c == "b" else 0))
    dls = folders.image_folder_loaders(tmp_path / "d", 8, batch_size=4, valid_pct=0.2, seed=1)
    train = list(dls.train)
    valid = list(dls.valid)
    xb, yb = train[0]
    assert xb.dtype == torch.float32 and xb.shape == (4, 1, 8, 8) and -1 <= xb.min() and xb.max() <= 1
    assert sum(len(b[0]) for b in train) == 16 and sum(len(b[0]) for b in valid) == 4
    means = lambda bs: sorted(round(float(b[0][i].mean()), 4) for b in bs for i in range(len(b[0])))  # noqa: E731
    assert set(means(train)).isdisjoint(means(valid))
    again = folders.image_folder_loaders(tmp_path / "d", 8, batch_size=4, valid_pct=0.2, seed=1)
    assert means(list(again.valid)) == means(valid)
    other = folders.image_folder_loaders(tmp_path / "d", 8, batch_size=4, valid_pct=0.2, seed=2)
    assert means(list(other.valid)) != means(valid)


def test_unlabelled_loaders_yield_one_tuples(tmp_path):
    for i in range(3):
        save(tmp_path / f"{i}.png", i)
    dls = folders.image_folder_loaders(tmp_path, 4, batch_size=8, valid_pct=0.3)
    (batch,) = list(dls.train)
    assert len(batch) == 1 and batch[0].shape == (2, 1, 4, 4)
    assert sum(len(b[0]) for b in dls.valid) == 1

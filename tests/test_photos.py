"""Photo crops: finding photos, holding out whole photos, deterministic random crops, the cache, the real wallpapers.

Tests on the real photographs FAIL (never skip) when Debian's wallpaper packages are missing.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from minidiffusion.data import photos as ph
from minidiffusion.errors import ConfigError, DataError

N_PHOTOS = 23  # 11 from plasma-workspace-wallpapers, 12 from mate-backgrounds


@pytest.fixture(autouse=True)
def cache_home(tmp_path, monkeypatch) -> Path:
    """Every test gets its own cache; returns the folder the crops go to."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    return tmp_path / "xdg" / "minidiffusion" / "photos"


@pytest.fixture(scope="session")
def wallpapers() -> list[Path]:
    """The real photographs among Debian's wallpapers; FAILS (never skips) the test when they are missing."""
    try:
        return ph.find_photos()
    except DataError as e:
        problem = str(e)
    pytest.fail("photo tests need Debian's wallpapers (`apt-get install plasma-workspace-wallpapers "
                f"mate-backgrounds`): {problem}", pytrace=False)


COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30), (30, 200, 200)]


@pytest.fixture
def solid(tmp_path) -> Path:
    """Five solid-colour photos of different sizes (JPEG and PNG, one in a sub-folder, plus a hidden file)."""
    root = tmp_path / "mine"
    (root / "sub").mkdir(parents=True)
    for i, colour in enumerate(COLOURS):
        name = f"sub/p{i}.png" if i == 4 else f"p{i}.{'jpg' if i % 2 else 'png'}"
        Image.new("RGB", (160 + 40 * i, 120), colour).save(root / name, quality=95)
    (root / ".hidden.jpg").write_bytes(b"not a photo")
    (root / "notes.txt").write_text("not a photo")
    return root


def colour_of(crop: torch.Tensor) -> int:
    """Index in COLOURS nearest to a crop's mean colour."""
    mean = crop.float().mean(dim=(1, 2))
    return int(torch.argmin(((torch.tensor(COLOURS).float() - mean) ** 2).sum(1)))


def test_user_folder_is_found_sorted_without_hidden_files(solid):
    assert [p.relative_to(solid).as_posix() for p in ph.find_photos(solid)] == \
        ["p0.png", "p1.jpg", "p2.png", "p3.jpg", "sub/p4.png"]


def test_missing_or_empty_folders_name_the_fix(tmp_path, monkeypatch):
    with pytest.raises(DataError, match="does not exist"):
        ph.find_photos(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no .png/.jpg/.jpeg photos found"):
        ph.find_photos(tmp_path / "empty")
    monkeypatch.setattr(ph, "PLASMA_DIR", tmp_path / "none")
    monkeypatch.setattr(ph, "MATE_DIR", tmp_path / "none")
    with pytest.raises(DataError, match="apt-get install plasma-workspace-wallpapers mate-backgrounds"):
        ph.find_photos()
    with pytest.raises(DataError, match="apt-get install plasma-workspace-wallpapers mate-backgrounds"):
        ph.photo_crops(n=4)


def test_split_holds_out_whole_photos_deterministically():
    paths = [Path(f"photo{i:02d}.jpg") for i in range(23)]
    train, test = ph.photo_split(paths[::-1])
    assert len(test) == 5 and sorted(train + test) == paths and set(train).isdisjoint(test)
    assert train == sorted(train) and test == sorted(test)
    assert ph.photo_split(paths) == (train, test)  # input order does not matter
    assert len({tuple(ph.photo_split(paths, seed=s)[1]) for s in range(5)}) > 1
    assert len(ph.photo_split(paths[:2])[1]) == 1
    with pytest.raises(DataError, match="at least 2 photos"):
        ph.photo_split(paths[:1])
    with pytest.raises(ConfigError, match="test_pct"):
        ph.photo_split(paths, test_pct=1.0)


def test_crops_shape_range_balance_and_determinism(solid):
    paths = ph.find_photos(solid)
    x = ph.random_crops(paths, 20, size=16, seed=3)
    assert x.shape == (20, 3, 16, 16) and x.dtype == torch.uint8 and x.is_contiguous()
    assert sorted(colour_of(c) for c in x) == sorted(list(range(5)) * 4)  # spread evenly over the photos
    for c in x:
        assert (c.float() - torch.tensor(COLOURS[colour_of(c)]).view(3, 1, 1)).abs().max() < 12  # JPEG noise
    assert torch.equal(ph.random_crops(paths, 20, size=16, seed=3), x)
    assert [colour_of(c) for c in ph.random_crops(paths, 20, size=16, seed=4)] != [colour_of(c) for c in x]
    assert ph.random_crops(paths, 0, size=16).shape == (0, 3, 16, 16)
    with pytest.raises(ConfigError, match="scale"):
        ph.random_crops(paths, 4, scale=(0.5, 2.0))


def test_zoom_one_crops_are_the_photos_own_pixels(tmp_path):
    """scale=(1, 1): every crop is an exact window of the photo (what super-resolution needs as ground truth)."""
    yy, xx = np.mgrid[0:200, 0:300]
    arr = np.stack([xx % 256, yy % 256, (xx // 256) * 100], axis=-1).astype(np.uint8)
    Image.fromarray(arr).save(tmp_path / "coords.png")
    x = ph.random_crops([tmp_path / "coords.png"], 8, size=32, seed=0, scale=(1.0, 1.0)).numpy()
    for crop in x:
        r0, g0 = int(crop[0, 0, 0]), int(crop[1, 0, 0])
        x0 = r0 + 256 * (int(crop[2, 0, 0]) // 100)
        assert np.array_equal(crop.transpose(1, 2, 0), arr[g0:g0 + 32, x0:x0 + 32])
    assert len({(int(c[0, 0, 0]), int(c[1, 0, 0])) for c in x}) == 8  # random positions


def test_zoomed_out_crops_see_more_of_the_photo(tmp_path):
    """A photo of 1-pixel stripes: native crops keep them, strongly shrunk crops average them to gray."""
    arr = np.zeros((256, 256, 3), np.uint8)
    arr[:, ::2] = 255
    Image.fromarray(arr).save(tmp_path / "stripes.png")
    native = ph.random_crops([tmp_path / "stripes.png"], 4, size=32, scale=(1.0, 1.0)).float()
    shrunk = ph.random_crops([tmp_path / "stripes.png"], 4, size=32, scale=(0.125, 0.125)).float()
    assert native.std() > 120 and shrunk.std() < 20


def test_huge_photos_are_downscaled_on_load(tmp_path):
    Image.new("RGB", (6000, 1000), (10, 20, 30)).save(tmp_path / "wide.jpg")
    img = ph.load_photo(tmp_path / "wide.jpg")
    assert max(img.size) <= ph.MAX_SIDE and img.mode == "RGB"
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 not really")
    with pytest.raises(DataError, match=r"cannot read the photo .*broken.jpg.*remove or replace it"):
        ph.random_crops([tmp_path / "broken.jpg"], 2)


def test_photo_crops_split_and_cache(solid, cache_home, monkeypatch):
    train = ph.photo_crops("train", n=40, size=8, root=solid)
    test = ph.photo_crops("test", n=10, size=8, root=solid)
    assert train.shape == (40, 3, 8, 8) and test.shape == (10, 3, 8, 8)
    assert {colour_of(c) for c in train}.isdisjoint({colour_of(c) for c in test})  # no photo on both sides
    assert len({colour_of(c) for c in ph.photo_crops("all", n=40, size=8, root=solid)}) == 5

    def must_not_crop(*args):
        raise AssertionError("a cache hit must not crop")
    with monkeypatch.context() as m:
        m.setattr(ph, "random_crops", must_not_crop)
        start = time.perf_counter()
        assert torch.equal(ph.photo_crops("train", n=40, size=8, root=solid), train)
        assert time.perf_counter() - start < 0.5
    assert len(list(cache_home.glob("*.safetensors"))) == 3
    changed = solid / "p0.png"
    Image.new("RGB", (160, 120), (0, 0, 0)).save(changed)
    os.utime(changed, ns=(1, changed.stat().st_mtime_ns + 10**9))
    ph.photo_crops("train", n=40, size=8, root=solid)
    assert len(list(cache_home.glob("*.safetensors"))) == 4  # a changed photo is a new entry
    ph.photo_crops("train", n=40, size=8, root=solid, cache=False)
    assert len(list(cache_home.glob("*.safetensors"))) == 4
    with pytest.raises(ConfigError, match="split"):
        ph.photo_crops("valid", root=solid)


# -- the real photographs -----------------------------------------------------------------------
@pytest.mark.integration
def test_real_photos_one_resolution_each(wallpapers):
    assert len(wallpapers) == N_PHOTOS
    plasma = [p for p in wallpapers if p.is_relative_to(ph.PLASMA_DIR)]
    assert sorted(p.parents[2].name for p in plasma) == sorted(ph.PLASMA_PHOTOS)  # one file per wallpaper
    assert len(wallpapers) - len(plasma) == len(ph.MATE_PHOTOS)
    for p in wallpapers:
        with Image.open(p) as img:
            assert min(img.size) >= 1000, p


@pytest.mark.integration
def test_real_crops(wallpapers):
    train_photos, test_photos = ph.photo_split(wallpapers)
    assert len(test_photos) == 5 and set(train_photos).isdisjoint(test_photos)
    start = time.perf_counter()
    test = ph.photo_crops("test", n=100, size=64)
    assert time.perf_counter() - start < 10
    assert test.shape == (100, 3, 64, 64) and test.dtype == torch.uint8
    assert int(test.max()) > 200 and int(test.min()) < 30  # real photos span the range
    assert torch.equal(ph.photo_crops("test", n=100, size=64), test)

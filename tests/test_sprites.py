"""The Wesnoth sprites set (counts, unit-level deterministic split) and TrivialAugment's invariants."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from minidiffusion.data import trivial_augment as ta
from minidiffusion.data.sprites import MIN_IMAGES, SPRITE_ROOT, decode_sprite, load_sprites, sprite_split, sprite_units
from minidiffusion.data.trivial_augment import OPS, TrivialAugment, apply_op
from minidiffusion.errors import DataError


def _sprite(path: Path, colour, opaque: bool = True) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.new("RGBA", (72, 72), (0, 0, 0, 0))
    if opaque:
        img.paste(Image.new("RGBA", (30, 40), (*colour, 255)), (20, 16))
    img.save(path)


def test_units_group_frames_with_their_base():
    files = [Path(p) for p in ("trolls/troll-hero.png", "trolls/troll-hero-attack-ne-2.png",
                               "trolls/troll-hero+female.png", "trolls/troll.png", "trolls/troll-die-1.png",
                               "woses/wose.png", "woses/elder-wose-die-decay-1.png")]
    assert sprite_units(files) == ["trolls/troll", "trolls/troll", "trolls/troll", "trolls/troll", "trolls/troll",
                                   "woses/wose", "woses/elder-wose-die-decay"]


def test_split_holds_out_whole_units_deterministically():
    labels = torch.tensor([0] * 10 + [1] * 6)
    units = ["a"] * 3 + ["b"] * 3 + ["c"] * 2 + ["d"] * 2 + ["e"] * 3 + ["f"] * 3
    tr, te = sprite_split(labels, units, test_pct=0.2, seed=0)
    tr2, te2 = sprite_split(labels, units, test_pct=0.2, seed=0)
    assert torch.equal(tr, tr2) and torch.equal(te, te2)
    assert sorted(tr.tolist() + te.tolist()) == list(range(16))
    held = {units[i] for i in te.tolist()}
    assert not held & {units[i] for i in tr.tolist()}  # a unit is on one side only
    for c in (0, 1):  # at least 20% of each class held out, never more than half
        n_c, held_c = int((labels == c).sum()), int((labels[te] == c).sum())
        assert 0.2 * n_c <= held_c <= n_c / 2


def test_loader_on_a_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    root = tmp_path / "units"
    for race, colour in (("drakes", (200, 50, 0)), ("elves", (0, 160, 0))):
        for u in range(6):
            for frame in ("", "-attack-1", "-defend"):
                _sprite(root / race / f"unit{'abcdef'[u]}{frame}.png", colour)
    _sprite(root / "drakes" / "unita-shadow.png", (0, 0, 0))  # a layer piece: left out
    _sprite(root / "drakes" / "flame-1.png", (255, 0, 0), opaque=False)  # an effect frame: left out
    for i in range(3):
        _sprite(root / "boats" / f"boat{i}.png", (0, 0, 200))  # fewer than MIN_IMAGES: class dropped
    _sprite(root / "dice.png", (1, 2, 3))  # not in a race folder
    monkeypatch.setattr("minidiffusion.data.sprites.MIN_IMAGES", 10)
    full = load_sprites("all", image_size=32, root=root)
    assert full.class_names == ["drakes", "elves"] and len(full) == 36
    assert full.images.shape == (36, 3, 32, 32) and full.images.dtype == torch.uint8
    assert full.images[:, :, 0, 0].tolist()[0] == [128, 128, 128]  # composited on the grey background
    train, test = load_sprites("train", 32, root=root), load_sprites("test", 32, root=root)
    assert len(train) + len(test) == 36 and len(test) >= 4
    assert not {f.split("-")[0].removesuffix(".png") for f in test.files} & \
        {f.split("-")[0].removesuffix(".png") for f in train.files}
    assert load_sprites("test", 32, root=root).files == test.files
    with pytest.raises(DataError, match="wesnoth"):
        load_sprites(root=tmp_path / "missing")


def test_decode_sprite_skips_effects(tmp_path):
    _sprite(tmp_path / "glow.png", (255, 255, 0), opaque=False)
    assert decode_sprite(tmp_path / "glow.png") is None


@pytest.mark.integration
def test_the_real_sprites():
    if not SPRITE_ROOT.is_dir():
        pytest.fail("the sprites need `apt-get install wesnoth-1.16-data`", pytrace=False)
    train, test = load_sprites("train"), load_sprites("test")
    assert len(train.class_names) == 20 and train.class_names == test.class_names
    assert 5000 < len(train) + len(test) < 6500
    assert min(train.counts().values()) >= MIN_IMAGES // 2 and all(v > 0 for v in test.counts().values())
    assert 0.1 <= len(test) / (len(train) + len(test)) <= 0.25
    assert train.images.shape[1:] == (3, 64, 64)
    assert not set(sprite_units([Path(f) for f in train.files])) & set(sprite_units([Path(f) for f in test.files]))


# ---- TrivialAugment -------------------------------------------------------------------------------


def _images(n=8, c=3, s=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 256, (n, c, s, s), generator=g).float() / 127.5 - 1).clamp(-1, 1)


@pytest.mark.parametrize("op", OPS)
def test_every_op_keeps_shape_and_range(op):
    x = _images()
    for m in (-1.0, -0.3, 0.0, 0.5, 1.0):
        y = apply_op(x, op, m)
        assert y.shape == x.shape and y.dtype == x.dtype
        assert y.min() >= -1 and y.max() <= 1 and torch.isfinite(y).all()


@pytest.mark.parametrize("op", ["brightness", "contrast", "color", "sharpness", "rotate", "shear_x", "shear_y",
                                "translate_x", "translate_y"])
def test_zero_strength_is_identity(op):
    x = _images()
    assert torch.allclose(apply_op(x, op, 0.0), x, atol=1e-5)


def test_ops_against_closed_forms():
    x = _images(s=8)
    assert torch.allclose(apply_op(x, "solarize", 1.0), -x, atol=1e-6)  # threshold 0: every pixel inverted
    assert torch.allclose(apply_op(x, "brightness", -1.0), -1 + 0.01 * (x + 1), atol=1e-6)  # factor 0.01
    y = apply_op(x, "posterize", 1.0)  # 2 bits: 4 levels
    assert len(torch.unique(torch.round((y + 1) * 127.5))) <= 4
    grey = torch.full((1, 3, 8, 8), 0.2)
    assert torch.allclose(apply_op(grey, "color", 0.7), grey, atol=1e-6)  # a grey image has no colour to change
    flipped = apply_op(x, "rotate", 180 / ta.MAX_ROTATE, mode="nearest")  # 180 degrees about the centre
    assert torch.allclose(flipped, x.flip(-1).flip(-2), atol=1e-5)
    shifted = apply_op(x, "translate_x", 0.125 / ta.MAX_TRANSLATE, fill=-1.0, mode="nearest")  # 1/8 side: 1 px left
    assert torch.allclose(shifted[..., :-1], x[..., 1:], atol=1e-5) and (shifted[..., -1] == -1).all()
    auto = apply_op(x * 0.5, "autocontrast", 0.0)
    assert torch.allclose(auto.amin(dim=(2, 3)), torch.full((8, 3), -1.0), atol=1e-6)
    assert torch.allclose(auto.amax(dim=(2, 3)), torch.ones(8, 3), atol=1e-6)


def test_equalize_matches_pil():
    from PIL import ImageOps

    x = _images(n=2, s=16, seed=3) * 0.4 + 0.1
    y = apply_op(x, "equalize", 0.0)
    for i in range(2):
        u8 = torch.round((x[i] + 1) * 127.5).to(torch.uint8).permute(1, 2, 0).numpy()
        ref = torch.from_numpy(np.array(ImageOps.equalize(Image.fromarray(u8))))
        assert torch.equal(torch.round((y[i] + 1) * 127.5).to(torch.uint8), ref.permute(2, 0, 1))


def test_one_op_per_image_and_reproducible():
    x = _images(n=64)
    aug = TrivialAugment(flip=0.0, generator=torch.Generator().manual_seed(1))
    params = aug.params(64)
    assert params.op.shape == (64,) and len(params.op.unique()) > 5  # ops vary across the batch
    assert (params.magnitude.abs() <= 1).all()
    y1 = TrivialAugment(generator=torch.Generator().manual_seed(5))(x)
    y2 = TrivialAugment(generator=torch.Generator().manual_seed(5))(x)
    assert torch.equal(y1, y2) and y1.shape == x.shape and y1.min() >= -1 and y1.max() <= 1
    for k, name in enumerate(OPS):  # each image got exactly its own op
        idx = torch.nonzero(params.op == k).flatten()
        if len(idx):
            ref = apply_op(x[idx], name, params.magnitude[idx])
            got = ta.apply_params(x, params, pad=0)[idx]
            assert torch.allclose(got, ref, atol=1e-6)


def test_pair_applies_the_same_op_to_input_and_target():
    hi = _images(n=32, s=16)
    same = [hi.clone(), hi.clone()]
    out = TrivialAugment(pad=2, flip=0.5, generator=torch.Generator().manual_seed(0)).pair(same)
    assert torch.equal(out[0], out[1])  # identical tensors stay identical: one draw for both
    assert not torch.equal(out[0], hi)
    hi = hi * 0.25 - 0.75  # dark enough that brightening never clips: the ops commute with 2x2 averaging
    lo = torch.nn.functional.avg_pool2d(hi, 2)
    aug = TrivialAugment(pad=1, flip=0.5, ops=("identity", "brightness", "solarize"),
                         generator=torch.Generator().manual_seed(0))
    a_lo, a_hi = aug.pair([lo, hi])
    assert a_lo.shape == lo.shape and a_hi.shape == hi.shape
    bright = TrivialAugment(pad=1, flip=0.5, ops=("identity", "brightness"), generator=torch.Generator().manual_seed(0))
    b_lo, b_hi = bright.pair([lo, hi])
    assert torch.allclose(torch.nn.functional.avg_pool2d(b_hi, 2), b_lo, atol=1e-5)
    with pytest.raises(ValueError, match="integer multiples"):
        aug.pair([lo, hi[:, :, :15, :15]])

"""Batch augmentation: each transform does exactly what it says, per image, reproducibly."""

import torch

from minidiffusion.data.augment import BatchAugment, random_crop, random_erase, random_flip


def _batch(n=64, c=1, s=8):
    return torch.rand(n, c, s, s, generator=torch.Generator().manual_seed(0)) * 2 - 1


def test_random_crop_is_a_shift_with_background_fill():
    x = _batch()
    y = random_crop(x, pad=2, generator=torch.Generator().manual_seed(1))
    assert y.shape == x.shape
    shifts = set()
    for i in range(len(x)):
        xp = torch.nn.functional.pad(x[i], (2, 2, 2, 2), value=-1.0)
        found = [(dy, dx) for dy in range(5) for dx in range(5) if torch.equal(xp[:, dy:dy + 8, dx:dx + 8], y[i])]
        assert found, "every output must be a crop of the padded input"
        shifts.add(found[0])
    assert len(shifts) > 10  # offsets vary per image


def test_random_flip_mirrors_about_half():
    x = _batch(400)
    y = random_flip(x, 0.5, generator=torch.Generator().manual_seed(0))
    flipped = torch.tensor([torch.equal(y[i], x[i].flip(-1)) for i in range(len(x))])
    same = torch.tensor([torch.equal(y[i], x[i]) for i in range(len(x))])
    assert bool((flipped | same).all())
    assert 0.4 < flipped.float().mean().item() < 0.6


def test_random_erase_replaces_one_rectangle_within_range():
    x = _batch(200, s=16)
    y = random_erase(x, p=1.0, scale=(0.05, 0.2), generator=torch.Generator().manual_seed(0))
    assert y.min() >= -1 and y.max() <= 1
    changed = (y != x)[:, 0]
    frac = changed.flatten(1).float().mean(1)
    assert (frac > 0).all() and frac.max() <= 0.35
    for m in changed[:20]:  # the changed pixels lie inside one axis-aligned box
        rows, cols = m.any(1).nonzero(), m.any(0).nonzero()
        box = m[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
        assert box.float().mean() > 0.8  # nearly all of the bounding box changed (noise may equal x rarely)
    assert torch.equal(random_erase(x, p=0.0), x)


def test_batch_augment_is_reproducible_with_a_generator():
    x = _batch()
    a = BatchAugment(pad=2, flip=0.5, erase=0.5, generator=torch.Generator().manual_seed(3))(x)
    b = BatchAugment(pad=2, flip=0.5, erase=0.5, generator=torch.Generator().manual_seed(3))(x)
    assert torch.equal(a, b) and not torch.equal(a, x)

"""TensorLoader: seeded shuffling and resume offsets."""

import torch

from minidiffusion.data.loaders import TensorLoader


def _images(n: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    """Return n asymmetric 1x2x3 uint8 images (left column 0, item id on the right) and ids."""
    x = torch.zeros(n, 1, 2, 3, dtype=torch.uint8)
    x[..., -1] = torch.arange(1, n + 1, dtype=torch.uint8).view(n, 1, 1)
    return x, torch.arange(n)


def _mirrored(loader: TensorLoader) -> dict[int, bool]:
    """Return {item id: whether this pass showed it mirrored} over one pass of `loader`."""
    seen = {}
    for xb, yb in loader:
        assert torch.equal(xb[..., 1:-1], torch.zeros_like(xb[..., 1:-1]))
        for img, i in zip(xb, yb.tolist(), strict=True):
            assert img.max() == i + 1  # pixels stay with their label
            seen[i] = bool(img[..., 0].max() > 0)
    return seen


def test_nothing_is_mirrored_and_unshuffled_batches_are_views():
    x, y = _images()
    loader = TensorLoader(x, y, batch_size=8)
    assert not any(_mirrored(loader).values())
    xb, _ = next(iter(loader))
    assert xb.data_ptr() == x.data_ptr()  # a slice, not a copy

"""The image sets a recipe can name with `data=`: one function that returns a split of any of them.

    fashion-mnist   60,000 / 10,000 grey 32x32 garments, 10 classes (data/fashion_mnist.py)
    emoji           3,287 / 368 colour emoji at `image_size`, labels group (9) or subgroup (99) (data/emoji.py)
    photos          random crops of 23 real photographs at `image_size`, split by photo (data/photos.py)
    a folder path   your own PNG/JPEG images, sub-folders as classes (data/folders.py)

Each comes back as uint8 images [N, C, S, S] in 0..255 with int64 labels [N] (or None) and class names.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import ConfigError

__all__ = ["ImageSet", "load_image_set", "SET_NAMES"]

SET_NAMES = ("fashion-mnist", "emoji", "photos")


@dataclass
class ImageSet:
    """One split of an image set: uint8 images [N, C, S, S], int64 labels [N] or None, class names or None."""

    images: torch.Tensor
    labels: torch.Tensor | None
    class_names: list[str] | None

    def __len__(self) -> int:
        return len(self.images)


def load_image_set(name: str, split: str = "train", image_size: int = 64, label: str | None = "group",
                   n_crops: int = 4096, seed: int = 0) -> ImageSet:
    """Return split "train" or "test" of the set `name` (see the module docstring).

    `label` picks the emoji labels (group | subgroup | None); `n_crops` and `seed` the photo crops
    (the test split gets a quarter as many, from its own held-out photos). A folder has no test
    split: "test" is refused there.
    """
    if split not in ("train", "test"):
        raise ConfigError(f"split must be train or test, got {split!r}")
    if name == "fashion-mnist":
        from .fashion_mnist import CLASSES, load_fashion_mnist

        x, y = load_fashion_mnist(split)
        return ImageSet(x, y, list(CLASSES))
    if name == "emoji":
        from .emoji import load_emoji

        e = load_emoji(split, image_size=image_size)
        if label is None:
            return ImageSet(e.images, None, None)
        return ImageSet(e.images, e.labels(label), list(e.group_names if label == "group" else e.subgroup_names))
    if name == "photos":
        from .photos import photo_crops

        n = n_crops if split == "train" else max(1, n_crops // 4)
        return ImageSet(photo_crops(split, n=n, size=image_size, seed=seed), None, None)
    if split == "test":
        raise ConfigError(f"{name} is a folder of images, which has no test split; use data=emoji, photos or "
                          "fashion-mnist for a held-out evaluation")
    from .folders import load_image_folder

    x, y, names = load_image_folder(name, image_size)
    return ImageSet(x, y, names)

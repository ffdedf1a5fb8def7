"""Large labelled folders: the Tiny ImageNet reader on a mini copy made here, class folders, the .npy cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from minidiffusion.data import folders
from minidiffusion.data.folders import is_tiny_imagenet, load_class_folder, load_tiny_imagenet
from minidiffusion.errors import DataError

WNIDS = ["n01443537", "n01629819", "n02124075"]
NAMES = {"n01443537": "goldfish, Carassius auratus", "n01629819": "European fire salamander",
         "n02124075": "Egyptian cat"}
COLOURS = {"n01443537": (230, 30, 30), "n01629819": (30, 230, 30), "n02124075": (30, 30, 230)}
VAL = [("val_0.JPEG", "n02124075"), ("val_1.JPEG", "n01443537"), ("val_2.JPEG", "n01629819"),
       ("val_3.JPEG", "n01443537")]


def _jpeg(path: Path, colour) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (64, 64), colour).save(path, format="JPEG", quality=95)


def make_tiny_imagenet(root: Path, per_class: int = 3) -> Path:
    """A mini Tiny ImageNet in the published layout: 3 classes, `per_class` train images each, 4 val images,
    each image a solid colour that names its class; words.txt also lists classes not in wnids.txt."""
    root.mkdir(parents=True)
    (root / "wnids.txt").write_text("\n".join(WNIDS) + "\n")
    words = {**NAMES, "n00001740": "entity", "n99999999": "not a class here"}
    (root / "words.txt").write_text("".join(f"{k}\t{v}\n" for k, v in sorted(words.items())))
    for w in WNIDS:
        for i in range(per_class):
            _jpeg(root / "train" / w / "images" / f"{w}_{i}.JPEG", COLOURS[w])
        (root / "train" / w / f"{w}_boxes.txt").write_text("")  # the real set has these; they are not images
    for name, w in VAL:
        _jpeg(root / "val" / "images" / name, COLOURS[w])
    (root / "val" / "val_annotations.txt").write_text("".join(f"{n}\t{w}\t0\t0\t63\t63\n" for n, w in VAL))
    (root / "test" / "images").mkdir(parents=True)
    _jpeg(root / "test" / "images" / "test_0.JPEG", (128, 128, 128))
    return root


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _colour_class(images: torch.Tensor) -> list[int]:
    """The class whose colour each uint8 [N, 3, S, S] image is closest to (index into WNIDS)."""
    ref = torch.tensor([COLOURS[w] for w in WNIDS], dtype=torch.float32)  # [3, 3]
    mean = images.float().mean(dim=(2, 3))  # [N, 3]
    return torch.cdist(mean, ref).argmin(1).tolist()


def test_tiny_imagenet_reader(tmp_path, cache):
    root = make_tiny_imagenet(tmp_path / "tiny-imagenet-200")
    assert is_tiny_imagenet(root) and not is_tiny_imagenet(tmp_path)
    train, val = load_tiny_imagenet(root, image_size=32)
    assert train.class_names == WNIDS and train.descriptions == [NAMES[w] for w in WNIDS]
    assert train.images.shape == (9, 3, 32, 32) and train.images.dtype == torch.uint8
    assert val.images.shape == (4, 3, 32, 32)
    assert train.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert val.labels.tolist() == [WNIDS.index(w) for _, w in VAL]
    assert _colour_class(train.images) == train.labels.tolist()  # each image decoded under its own label
    assert _colour_class(val.images) == val.labels.tolist()
    assert train.counts() == dict.fromkeys(WNIDS, 3)
    assert train.files[0] == f"train/{WNIDS[0]}/images/{WNIDS[0]}_0.JPEG"
    assert list(cache.rglob("*.npy")), "the decoded set is cached"


def test_tiny_imagenet_memory_mapped_cache(tmp_path, cache, monkeypatch):
    root = make_tiny_imagenet(tmp_path / "tiny-imagenet-200")
    first, _ = load_tiny_imagenet(root, image_size=16, mmap=True)
    calls, modes = [], []
    load = np.load
    monkeypatch.setattr(folders, "_decode_into", lambda *a: calls.append(a) or ([], []))
    monkeypatch.setattr(folders.np, "load", lambda *a, **k: modes.append(k.get("mmap_mode")) or load(*a, **k))
    again, _ = load_tiny_imagenet(root, image_size=16, mmap=True)  # from the cache: nothing decoded
    assert not calls
    assert modes == ["c", "c"]  # train and val memory-mapped (copy-on-write)
    assert torch.equal(first.images, again.images) and torch.equal(first.labels, again.labels)


def test_tiny_imagenet_refuses_broken_copies(tmp_path, cache):
    root = make_tiny_imagenet(tmp_path / "tiny-imagenet-200")
    (root / "val" / "val_annotations.txt").write_text("val_0.JPEG\tn07777777\t0\t0\t1\t1\n")
    with pytest.raises(DataError, match="n07777777"):
        load_tiny_imagenet(root)
    (root / "words.txt").unlink()
    with pytest.raises(DataError, match="words.txt is missing"):
        load_tiny_imagenet(root)
    with pytest.raises(DataError, match="does not exist"):
        load_tiny_imagenet(tmp_path / "nowhere")


def test_class_folder(tmp_path, cache):
    for c, colour in (("b", (0, 0, 255)), ("a", (255, 0, 0))):
        for i in range(2):
            d = tmp_path / "set" / c
            d.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (40, 30), colour).save(d / f"{i}.png")
    s = load_class_folder(tmp_path / "set", image_size=8)
    assert s.class_names == ["a", "b"] and s.labels.tolist() == [0, 0, 1, 1]
    assert s.images.shape == (4, 3, 8, 8)
    assert s.images[0, 0].float().mean() > 200 and s.images[2, 2].float().mean() > 200


@pytest.mark.integration
def test_classifier_trains_on_tiny_imagenet(tmp_path, cache):
    from minidiffusion.config import apply_overrides
    from minidiffusion.recipes.classifier import ClassifierConfig, train_classifier

    root = make_tiny_imagenet(tmp_path / "tiny-imagenet-200", per_class=4)
    cfg = apply_overrides(ClassifierConfig(), [f"data={root}", "image_size=16", "epochs=1", "batch_size=4",
                                               "trivial_augment=true", "model.in_channels=3", "model.n_classes=3",
                                               "model.channels=[8,16]", "model.blocks=[1]", "model.preact=true",
                                               "model.image_size=16", "precision=fp32"])
    result = train_classifier(cfg, tmp_path / "run", progress=False)
    assert 0.0 <= result["test_accuracy"] <= 1.0
    assert (tmp_path / "run" / "model.safetensors").is_file()

"""Shared fixtures. The real Fashion-MNIST data is loaded once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from minidiffusion.config import apply_overrides, save_config
from minidiffusion.data.fashion_mnist import find_fashion_mnist, load_fashion_mnist
from minidiffusion.errors import DataError
from minidiffusion.recipes.classifier import ClassifierConfig, build_classifier


@pytest.fixture(scope="session")
def fashion_mnist_dir() -> Path:
    """The folder holding the real Fashion-MNIST files; FAILS (never skips) the test when they are missing."""
    try:
        return find_fashion_mnist()
    except DataError as e:
        problem = str(e)
    pytest.fail(f"integration tests need the real Fashion-MNIST files "
                f"(`apt-get install dataset-fashion-mnist`): {problem}", pytrace=False)


@pytest.fixture(scope="session")
def fashion_mnist_data(fashion_mnist_dir: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{'train': (images uint8 [60000,1,32,32], labels int64), 'test': ...}; treat as read-only."""
    return {split: load_fashion_mnist(split, fashion_mnist_dir) for split in ("train", "test")}


@pytest.fixture(scope="session")
def tiny_features(tmp_path_factory) -> Path:
    """A small untrained-but-fixed ResNet saved as a classifier run: deterministic features for tests."""
    from safetensors.torch import save_file

    run = tmp_path_factory.mktemp("clf")
    cfg = apply_overrides(ClassifierConfig(), ["model.channels=[8, 16]", "model.blocks=[1]"])
    model = build_classifier(cfg)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(run / "model.safetensors"))
    save_config(cfg, run / "config.toml")
    return run


@pytest.fixture(scope="session")
def session_cache(tmp_path_factory) -> Path:
    """One XDG cache folder for the whole session (tests that render data once share it)."""
    return tmp_path_factory.mktemp("xdg")

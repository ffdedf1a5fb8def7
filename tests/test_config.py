"""Typed configs: presets load, overrides apply with types, unknown keys are rejected by name."""

import pytest
import torch

from minidiffusion.config import (
    apply_overrides,
    dump_toml,
    from_dict,
    list_presets,
    load_preset,
    save_config,
    to_dict,
)
from minidiffusion.errors import ConfigError
from minidiffusion.metrics.features import _network_files
from minidiffusion.nn.resnet import ResNet
from minidiffusion.recipes.classifier import ClassifierConfig


def test_shipped_classifier_preset_loads():
    assert "fmnist-classifier" in list_presets()
    cfg = from_dict(ClassifierConfig, load_preset("fmnist-classifier"))
    assert cfg.epochs == 5 and isinstance(cfg.model.channels, tuple)
    assert cfg.stem_init == "pca"  # v5
    net = ResNet(cfg.model).eval()  # v3/v4: full-resolution blocks and a flattening head, on 32x32 inputs
    assert net(torch.zeros(2, 1, 32, 32)).shape == (2, 10)
    assert net.n_features == 256 * 4 * 4


def test_shipped_feature_network_config_is_the_v2_recipe():
    # The config the FID/KID loader reads must keep rebuilding v2, whatever the preset becomes.
    _, config = _network_files(None)
    cfg = from_dict(ClassifierConfig, load_preset(str(config)))
    assert cfg.model.pool == "avg" and cfg.model.stem_blocks == 0 and cfg.model.blocks == (1, 1, 2)
    assert cfg.pad == 1 and cfg.optimizer == "adamw" and cfg.weight_decay == 0.01 and cfg.stem_init == "kaiming"


def test_overrides_are_typed_and_nested():
    cfg = apply_overrides(ClassifierConfig(), ["lr=3e-3", "tta=false", "model.channels=[8, 16]",
                                               "model.blocks=[2]", "epochs=7", "lr=1"])
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float)
    assert cfg.tta is False and cfg.epochs == 7
    assert cfg.model.channels == (8, 16) and cfg.model.blocks == (2,)


def test_unknown_key_lists_valid_ones():
    with pytest.raises(ConfigError, match=r"unknown config key 'lrr'.*valid keys: .*\blr\b"):
        apply_overrides(ClassifierConfig(), ["lrr=1"])
    with pytest.raises(ConfigError, match=r"'model.chanels'"):
        apply_overrides(ClassifierConfig(), ["model.chanels=[1]"])


def test_bad_values_are_clear():
    with pytest.raises(ConfigError, match="expects int"):
        apply_overrides(ClassifierConfig(), ["epochs=many"])
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides(ClassifierConfig(), ["epochs"])
    with pytest.raises(ConfigError, match="precision must be"):
        apply_overrides(ClassifierConfig(), ["precision=fp8"])


def test_unknown_preset_names_the_choices():
    with pytest.raises(ConfigError, match="fmnist-classifier"):
        load_preset("nope")


def test_toml_round_trip(tmp_path):
    cfg = apply_overrides(ClassifierConfig(), ["model.channels=[8, 16]", "model.blocks=[1]", "data=/x y"])
    path = save_config(cfg, tmp_path / "config.toml")
    back = from_dict(ClassifierConfig, load_preset(str(path)))
    assert back == cfg
    assert "[model]" in dump_toml(to_dict(cfg))

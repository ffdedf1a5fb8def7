"""Evaluation end to end: the eval command scores samples against the real test set, with its floor."""

import json

import pytest
import torch
from safetensors.torch import save_file

from minidiffusion.classifier import ClassifierConfig, build_classifier
from minidiffusion.cli import main
from minidiffusion.config import apply_overrides, save_config
from minidiffusion.diffusion.pipeline import save_model
from minidiffusion.diffusion.training import DiffusionConfig
from minidiffusion.evaluate import evaluate_samples, real_images
from minidiffusion.metrics.features import load_feature_network
from minidiffusion.nn.unet import UNet


@pytest.fixture(scope="module")
def tiny_features(tmp_path_factory):
    """A small untrained-but-fixed ResNet saved as a classifier run: deterministic features for tests."""
    run = tmp_path_factory.mktemp("clf")
    cfg = apply_overrides(ClassifierConfig(), ["model.channels=[8, 16]", "model.blocks=[1]"])
    model = build_classifier(cfg)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(run / "model.safetensors"))
    save_config(cfg, run / "config.toml")
    return run


@pytest.mark.integration
def test_reals_score_near_floor_and_noise_scores_far(tiny_features, fashion_mnist_dir, monkeypatch, tmp_path):
    monkeypatch.setenv("MINIDIFFUSION_DATA", str(fashion_mnist_dir))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    net = load_feature_network(tiny_features)
    reals, _ = real_images("train", 500, seed=1)
    good = evaluate_samples(reals, net, seed=1)
    noise = torch.rand(500, 1, 32, 32) * 2 - 1
    bad = evaluate_samples(noise, net, seed=1, with_reals=False)
    assert good["fid"] < 0.2 * bad["fid"]
    assert good["fid_reals"] == pytest.approx(good["fid"], rel=0.5)  # two draws of reals: same floor
    assert bad["kid"] > 10 * abs(good["kid"])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        evaluate_samples((reals + 1) / 2, net)  # the course's bug: a forgotten rescale is refused


@pytest.mark.integration
def test_eval_command_prints_and_appends_json(tiny_features, fashion_mnist_dir, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("MINIDIFFUSION_DATA", str(fashion_mnist_dir))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    cfg = apply_overrides(DiffusionConfig(), ["model.channels=[8, 16]", "model.blocks=[1, 1]",
                                              "model.attention=[false, false]", "model.norm_groups=4",
                                              "model.n_classes=10"])
    torch.manual_seed(0)
    net = UNet(cfg.model)
    torch.nn.init.normal_(net.out_conv.weight, std=0.5)  # an untrained net, but not the zero-output init
    run = tmp_path / "run"
    run.mkdir()
    save_model(net, cfg, [str(i) for i in range(10)], run / "model.safetensors")
    code = main(["eval", str(run), "--n", "100", "--steps", "2", "--sampler", "euler",
                 "--features", str(tiny_features)])
    assert code == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("fid", "kid", "kid_std", "fid_reals", "nfe", "seconds"):
        assert key in result, key
    assert result["nfe"] == 2 and result["fid"] > result["fid_reals"]
    logged = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert logged["phase"] == "eval" and logged["fid"] == result["fid"]

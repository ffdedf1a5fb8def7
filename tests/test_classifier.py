"""The classifier recipe: TTA and MC-dropout prediction, and real (short) training on Fashion-MNIST."""

import json
import math

import pytest
import torch
from torch import nn

from minidiffusion.config import apply_overrides
from minidiffusion.errors import ConfigError
from minidiffusion.nn.resnet import ResNet
from minidiffusion.recipes.classifier import (
    ClassifierConfig,
    evaluate_accuracy,
    predict_mc_dropout,
    predict_probs,
    predict_tta,
    train_classifier,
)


class _Asym(nn.Module):
    """A 'classifier' whose logits depend on which half of the image is brighter."""

    def forward(self, x):
        left, right = x[..., :2].mean((1, 2, 3)), x[..., 2:].mean((1, 2, 3))
        return torch.stack([left - right, right - left], 1) * 5

    def parameters(self, recurse=True):
        yield torch.zeros(1)


def test_tta_averages_the_image_and_its_mirror():
    x = torch.rand(6, 1, 4, 4) * 2 - 1
    m = _Asym()
    expected = (predict_probs(m, x) + predict_probs(m, x.flip(-1))) / 2
    assert torch.allclose(predict_tta(m, x), expected)
    assert torch.allclose(predict_tta(m, x), torch.full((6, 2), 0.5), atol=1e-6)  # symmetric model under TTA


def test_mc_dropout_keeps_dropout_on_and_batchnorm_frozen():
    torch.manual_seed(0)
    m = ResNet(channels=(8, 16), blocks=(1,), dropout=0.5).eval()
    x = torch.rand(8, 1, 32, 32) * 2 - 1
    bn = m.body[0][1]
    before = bn.running_mean.clone()
    mean, std = predict_mc_dropout(m, x, n=30)
    assert mean.shape == std.shape == (8, 10)
    assert torch.allclose(mean.sum(1), torch.ones(8), atol=1e-5)
    assert (std > 0).any(), "dropout must stay on"
    assert torch.equal(bn.running_mean, before) and not m.training
    plain = predict_probs(m, x)
    assert (mean - plain).abs().max() < 0.2  # the MC mean is near the deterministic prediction


def test_mc_dropout_needs_dropout():
    with pytest.raises(ValueError, match="Dropout"):
        predict_mc_dropout(nn.Sequential(nn.Flatten(), nn.Linear(4, 2)), torch.rand(2, 1, 2, 2))


def test_evaluate_accuracy_counts_matches():
    m = _Asym()
    x = torch.zeros(4, 1, 4, 4)
    x[:2, ..., :2] = 1  # left brighter -> class 0
    x[2:, ..., 2:] = 1  # right brighter -> class 1
    assert evaluate_accuracy(m, x, torch.tensor([0, 0, 1, 1])) == 1.0
    assert evaluate_accuracy(m, x, torch.tensor([1, 0, 1, 1])) == 0.75


def test_bad_config_values():
    with pytest.raises(ConfigError):
        apply_overrides(ClassifierConfig(), ["epochs=0"])
    with pytest.raises(ConfigError, match="optimizer must be one of"):
        apply_overrides(ClassifierConfig(), ["optimizer=lion"])
    with pytest.raises(ConfigError, match="anneal must be"):
        apply_overrides(ClassifierConfig(), ["anneal=step"])
    with pytest.raises(ConfigError, match="adam_beta2"):
        apply_overrides(ClassifierConfig(), ["adam_beta2=1.0"])


@pytest.mark.parametrize("name, kind", [("adamw", torch.optim.AdamW), ("sgd", torch.optim.SGD)])
def test_optimizer_choice_reaches_the_learner(name, kind, monkeypatch):
    from minidiffusion.recipes import classifier as clf

    monkeypatch.setattr(clf, "fashion_mnist_loaders", lambda *a, **k: _tiny_loaders())
    cfg = apply_overrides(ClassifierConfig(), [f"optimizer={name}", "weight_decay=0.001", "epochs=1", "adam_beta2=0.99",
                                               "model.channels=[4, 8]", "model.blocks=[1]", "device=cpu"])
    learn = clf.classifier_learner(cfg, progress=False)
    learn.fit(1)
    assert isinstance(learn.opt, kind)
    group = learn.opt.param_groups[0]
    assert group["weight_decay"] == 0.001
    if name == "sgd":
        assert group["nesterov"] and 0.85 <= group["momentum"] <= 0.95  # cycled by one-cycle
    else:
        assert group["betas"][1] == 0.99 and 0.85 <= group["betas"][0] <= 0.95  # beta1 cycled, beta2 kept


@pytest.mark.parametrize("decay_norm_bias", [True, False])
def test_decay_norm_bias_splits_the_parameters(decay_norm_bias, monkeypatch):
    from minidiffusion.recipes import classifier as clf

    monkeypatch.setattr(clf, "fashion_mnist_loaders", lambda *a, **k: _tiny_loaders())
    cfg = apply_overrides(ClassifierConfig(), ["weight_decay=0.05", f"decay_norm_bias={str(decay_norm_bias).lower()}",
                                               "model.channels=[4, 8]", "model.blocks=[1]", "device=cpu"])
    learn = clf.classifier_learner(cfg, progress=False)
    learn.fit(1)
    decays = {id(p): g["weight_decay"] for g in learn.opt.param_groups for p in g["params"]}
    params = list(learn.model.parameters())
    assert len(decays) == len(params)  # every parameter is optimised, once
    for name, p in learn.model.named_parameters():
        expect = 0.05 if decay_norm_bias or p.ndim >= 2 else 0.0  # 1-D: BatchNorm scales/shifts, biases
        assert decays[id(p)] == expect, name
    assert any(p.ndim < 2 for p in params) and any(p.ndim >= 2 for p in params)


def test_removed_alternate_flip_is_refused_with_the_commit_that_had_it():
    from minidiffusion.errors import ConfigError

    with pytest.raises(ConfigError, match="alternate_flip.*removed.*f91f512"):
        apply_overrides(ClassifierConfig(), ["alternate_flip=true"])
    assert not hasattr(apply_overrides(ClassifierConfig(), ["alternate_flip=false"]), "alternate_flip")


def _one_cycle_lrs(monkeypatch, override: str) -> list[float]:
    """Return the LR of each of the 16 steps of a 2-epoch tiny run of the recipe (peak 0.01) with `override`."""
    from minidiffusion.learner.schedules import OneCycleCB
    from minidiffusion.recipes import classifier as clf

    monkeypatch.setattr(clf, "fashion_mnist_loaders", lambda *a, **k: _tiny_loaders())
    cfg = apply_overrides(ClassifierConfig(), [override, "epochs=2", "lr=0.01", "model.channels=[4, 8]",
                                               "model.blocks=[1]", "device=cpu"])
    learn = clf.classifier_learner(cfg, progress=False)
    learn.fit(2)
    return learn.cb(OneCycleCB).lrs


@pytest.mark.parametrize("anneal", ["cos", "linear"])
def test_anneal_shapes_the_one_cycle(anneal, monkeypatch):
    lrs = _one_cycle_lrs(monkeypatch, f"anneal={anneal}")
    assert len(lrs) == 16 and lrs[3] == pytest.approx(0.01)  # torch puts the peak at step 0.25 * 16 - 1
    low = 0.01 / 25e4  # final LR: max / div_factor / final_div_factor
    quarter = lrs[6]  # a quarter of the way down from the peak (step 3) to the last step (15)
    if anneal == "linear":
        assert quarter == pytest.approx(0.01 - (0.01 - low) / 4)
    else:
        assert quarter == pytest.approx(low + (0.01 - low) * (1 + math.cos(math.pi / 4)) / 2)


@pytest.mark.parametrize("pct_start, peak", [(0.25, 3), (0.5, 7)])
def test_pct_start_places_the_one_cycle_peak(pct_start, peak, monkeypatch):
    lrs = _one_cycle_lrs(monkeypatch, f"pct_start={pct_start}")
    assert len(lrs) == 16 and max(range(16), key=lrs.__getitem__) == peak and lrs[peak] == pytest.approx(0.01)
    with pytest.raises(ConfigError, match="pct_start must be"):
        apply_overrides(ClassifierConfig(), ["pct_start=1"])


def test_stem_init_pca_sets_the_stem_from_training_patches(monkeypatch):
    from minidiffusion.data.images import uint8_to_float
    from minidiffusion.data.loaders import uint8_loaders
    from minidiffusion.nn.init import pca_init_
    from minidiffusion.recipes import classifier as clf

    g = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (64, 1, 32, 32), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, 10, (64,), generator=g)
    monkeypatch.setattr(clf, "fashion_mnist_loaders", lambda *a, **k: uint8_loaders((pixels, labels),
                                                                                    (pixels, labels), 8))
    tiny = ["model.channels=[4, 8]", "model.blocks=[1]", "device=cpu"]
    learn = clf.classifier_learner(apply_overrides(ClassifierConfig(), ["stem_init=pca", *tiny]), progress=False)
    expected = nn.Conv2d(1, 4, 5, padding=2, bias=False)
    pca_init_(expected, uint8_to_float(pixels))
    assert torch.allclose(learn.model.stem.weight, expected.weight)
    kaiming = clf.classifier_learner(apply_overrides(ClassifierConfig(), tiny), progress=False)
    assert not torch.allclose(kaiming.model.stem.weight, expected.weight)
    with pytest.raises(ConfigError, match="stem_init must be"):
        apply_overrides(ClassifierConfig(), ["stem_init=whiten"])


def _tiny_loaders():
    from minidiffusion.data.loaders import DataLoaders, TensorLoader

    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(64, 1, 32, 32, generator=g) * 2 - 1, torch.randint(0, 10, (64,), generator=g)
    return DataLoaders(TensorLoader(x, y, batch_size=8, shuffle=True), TensorLoader(x, y, batch_size=16))


@pytest.mark.integration
def test_short_real_training_learns_fashion_mnist(tmp_path, fashion_mnist_dir):
    """A tiny ResNet on 6,000 real images for 2 epochs must beat 70% test accuracy (chance: 10%)."""
    cfg = apply_overrides(ClassifierConfig(), [
        "epochs=2", "batch_size=128", "lr=1e-2", "train_limit=6000", "model.channels=[16, 32, 64]",
        "model.blocks=[1, 1]", f"data={fashion_mnist_dir}"])
    result = train_classifier(cfg, tmp_path / "run", progress=False)
    assert result["test_accuracy"] > 0.70, result
    assert result["test_accuracy_plain"] > 0.70
    run = tmp_path / "run"
    for name in ("config.toml", "metrics.jsonl", "loss.png", "model.safetensors"):
        assert (run / name).is_file(), name
    assert any((run / "checkpoints").iterdir())
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r["loss"] for r in records if r["phase"] == "train"]
    assert len(train) == 2 and train[1] < train[0]
    with pytest.raises(ConfigError, match="already holds a run"):
        train_classifier(cfg, run, progress=False)

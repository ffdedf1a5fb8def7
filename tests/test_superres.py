"""Super-resolution: the network's progression, tiling seams, freeze/unfreeze, PSNR against bicubic, the command."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from minidiffusion.artifacts import component_kind, save_component
from minidiffusion.cli import main
from minidiffusion.config import apply_overrides
from minidiffusion.errors import ConfigError
from minidiffusion.metrics.image_quality import psnr
from minidiffusion.nn.resnet import ResNet, ResNetConfig
from minidiffusion.nn.superres import (
    FeatureMaps,
    LinearUpsampler,
    SuperResConfig,
    SuperResNet,
    degrade,
    downscale,
    fit_linear_upsampler,
    upscale_bicubic,
)
from minidiffusion.paths import float32_state
from minidiffusion.pipelines.superres import Upscaler, evaluate_upscaler, luma, upscale, upscale_file

TINY = dict(channels=(8, 16), blocks=(1,))  # one stride-2 stage: a receptive field smaller than the tile margin


def _images(n=4, s=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, s // 4, s // 4, generator=g) * 2 - 1
    return upscale_bicubic(x, 4)  # smooth-ish images in [-1, 1]


def _randomise_norms(net: torch.nn.Module, seed: int = 0) -> None:
    """Give every BatchNorm non-trivial running statistics and affine weights, as after training."""
    g = torch.Generator().manual_seed(seed)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)


def test_degradation_shapes_and_range():
    x = _images(s=64)
    assert downscale(x).shape == (4, 3, 32, 32)
    y = degrade(x)
    assert y.shape == x.shape and y.min() >= -1 and y.max() <= 1
    assert not torch.equal(y, x)


@pytest.mark.parametrize("kw", [dict(skips=False, residual=False), dict(), dict(cross=True)])
def test_progression_networks(kw):
    net = SuperResNet(SuperResConfig(**kw)).eval()
    x = _images(n=2, s=64)
    with torch.no_grad():
        y = net(x)
    assert y.shape == x.shape
    if kw.get("residual", True):  # the last conv starts at zero: the network starts as its bicubic input
        assert torch.equal(y, x)
    with pytest.raises(ValueError, match="divisible by 8"):
        net(x[..., :60, :60])
    with pytest.raises(ValueError, match="cross convs"):
        SuperResConfig(skips=False, cross=True)


def test_back_projection_adds_only_what_the_downscale_removes():
    torch.manual_seed(0)
    net = SuperResNet(SuperResConfig(**TINY, project=True))
    torch.nn.init.normal_(net.head[-1].weight, std=0.05)
    torch.nn.init.normal_(net.head[-1].bias, std=0.05)  # a plain residual net would shift every pixel
    _randomise_norms(net)
    net.eval()
    flat = torch.full((2, 3, 64, 64), 0.3)
    inner = (..., slice(24, -24), slice(24, -24))  # beyond the reach of the convs' zero padding
    with torch.no_grad():
        assert torch.allclose(net(flat)[inner], flat[inner], atol=1e-5)  # a flat image stays flat, whatever the weights
        x = _images(n=2, s=32)
        y = net(x)
        plain = SuperResNet(SuperResConfig(**TINY))
        plain.load_state_dict(net.state_dict())
        f = plain.eval()(x) - x  # the residual before projection
    assert not torch.allclose(y, x, atol=1e-3)  # it still adds detail
    assert downscale(y - x).abs().mean() < 0.2 * downscale(f).abs().mean()  # ... that the downscale mostly drops
    with pytest.raises(ValueError, match="residual=true"):
        SuperResConfig(residual=False, project=True)


def test_linear_upsampler_starts_as_the_identity_and_its_fit_recovers_a_known_filter_bank():
    x = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1  # white noise: every filter
    up = LinearUpsampler(2, taps=4)  # tap is identifiable
    assert torch.equal(up(x), x) and up(x).dtype == torch.float32
    assert [name for name, _ in up.named_parameters()] == []  # fitted, never trained
    truth = LinearUpsampler(2, taps=4)
    truth.weight.copy_(torch.randn(truth.weight.shape, generator=torch.Generator().manual_seed(1)) * 0.1)
    target = truth(x)
    weights = torch.tensor([1.0, 0.0, 2.0, 1.0, 0.5, 3.0])
    assert fit_linear_upsampler(up, x, target, weights, batch_size=4) < 1e-8  # batches add up to the whole
    assert torch.allclose(up.weight, truth.weight, atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the base stays float32 under autocast
        assert torch.allclose(up(x), target, atol=1e-5)
    with pytest.raises(ValueError, match="non-negative"):
        fit_linear_upsampler(up, x, target, torch.zeros(6))
    with pytest.raises(ValueError, match="one shape"):
        fit_linear_upsampler(up, x, target[:, :1])


def test_linear_base_fit_beats_bicubic_and_starts_the_network():
    from minidiffusion.recipes.superres import SuperResTrainConfig, fit_base

    g = torch.Generator().manual_seed(0)
    x = (upscale_bicubic(torch.rand(16, 3, 8, 8, generator=g) * 2 - 1, 2) * 0.8).clamp(-1, 1)  # some detail
    raw = ((x + 1) * 127.5).round().to(torch.uint8)
    cfg = SuperResTrainConfig(model=SuperResConfig(**TINY, base="linear", base_taps=3), image_size=16,
                              loss="log_mse")
    net = SuperResNet(cfg.model).eval()
    assert torch.equal(net(degrade(x)), degrade(x))  # identity base + zero head: the bicubic input at init
    fitted = fit_base(net, cfg, raw)
    inp, target = degrade(x), raw.float() / 127.5 - 1
    w = 1 / (((inp - target) ** 2).mean(dim=(1, 2, 3)) + 4e-6)
    bicubic = float((w * ((inp - target) ** 2).mean(dim=(1, 2, 3))).sum() / w.sum())
    assert fitted < bicubic  # the weighted least-squares optimum beats the identity filter it started from
    with torch.no_grad():
        assert psnr(net(inp).clamp(-1, 1), target).mean() > psnr(inp, target).mean()
    assert fit_base(SuperResNet(SuperResConfig(**TINY)), cfg, raw) is None  # the bicubic base has nothing to fit
    with pytest.raises(ValueError, match="residual=true"):
        SuperResConfig(base="linear", residual=False)
    with pytest.raises(ConfigError, match="base"):
        apply_overrides(cfg, ['model.base="lanczos"'])


@pytest.mark.parametrize("kw", [dict(project=False), dict(project=True), dict(project=True, base="linear")])
def test_tiled_equals_untiled_away_from_borders(kw):
    torch.manual_seed(0)
    net = SuperResNet(SuperResConfig(**TINY, **kw))
    torch.nn.init.normal_(net.head[-1].weight, std=0.05)  # not the identity
    if net.base is not None:  # a linear base of 8 low-resolution taps a side, not the identity either
        net.base.weight.add_(torch.randn(net.base.weight.shape) * 0.01)
    _randomise_norms(net)
    model = Upscaler(net.eval(), net.cfg)
    x = torch.rand(3, 45, 61) * 2 - 1
    whole = upscale(x, model, tile=0)
    tiled = upscale(x, model, tile=40, overlap=32)  # blend margin 8 low-res pixels > the receptive radius
    assert whole.shape == tiled.shape == (3, 90, 122)
    assert not torch.allclose(whole, upscale_bicubic(x[None])[0], atol=1e-3)
    inner = (..., slice(24, -24), slice(24, -24))  # replicate padding at the borders reaches in ~14 pixels
    assert torch.allclose(tiled[inner], whole[inner], atol=1e-5)  # seams leave no trace


def test_upscale_rgb_gray_alpha_and_refusals(tmp_path):
    net = SuperResNet(SuperResConfig(**TINY))
    model = Upscaler(net.eval(), net.cfg)
    rgb = Image.fromarray((np.random.default_rng(0).random((21, 30, 3)) * 255).astype(np.uint8))
    assert upscale(rgb, model).size == (60, 42)
    gray = rgb.convert("L")
    out = upscale(gray, model)
    assert out.mode == "L" and out.size == (60, 42)
    rgba = rgb.convert("RGBA")
    assert upscale(rgba, model).mode == "RGBA"
    with pytest.raises(Exception, match="uint8"):
        upscale(torch.zeros(3, 8, 8, dtype=torch.uint8), model)
    with pytest.raises(ConfigError, match="overlap"):
        upscale(torch.zeros(3, 40, 40), model, tile=16, overlap=2)


def test_psnr_of_bicubic_equals_the_identity_network():
    net = SuperResNet(SuperResConfig(**TINY))  # residual, zero last conv: exactly bicubic
    model = Upscaler(net.eval(), net.cfg)
    x = _images(n=3, s=32)
    r = evaluate_upscaler(model, x)
    assert r["psnr"] == r["psnr_bicubic"] and r["psnr_gain"] == 0 and r["ssim"] == r["ssim_bicubic"]
    up = upscale_bicubic(downscale(x))
    mse = (up.double() - x.double()).pow(2).flatten(1).mean(1)
    assert r["psnr_bicubic"] == pytest.approx(float((10 * torch.log10(4 / mse)).mean()), abs=1e-3)  # closed form
    assert r["psnr_pooled_bicubic"] == pytest.approx(float(10 * torch.log10(4 / mse.mean())), abs=1e-3)
    assert r["psnr_pooled"] == r["psnr_pooled_bicubic"] <= r["psnr_bicubic"]  # Jensen: pooling weighs the worst
    assert "RGB" in r["protocol"] and "border" in r["protocol"]
    white = torch.ones(1, 3, 4, 4)
    assert torch.allclose(luma(white), torch.ones(1, 1, 4, 4).double())  # Y = 235: the top of the luma range
    assert torch.allclose(luma(-white), -torch.ones(1, 1, 4, 4).double())  # Y = 16


def _tiny_classifier(path) -> ResNet:
    torch.manual_seed(1)
    clf = ResNet(ResNetConfig(in_channels=3, n_classes=3, channels=(8, 16, 32), blocks=(1, 1), preact=True,
                              image_size=16, dropout=0.0))
    _randomise_norms(clf, seed=2)
    save_component(path / "model.safetensors", float32_state(clf), clf.cfg, "classifier")
    return clf


def test_feature_maps_stay_frozen(tmp_path):
    clf = _tiny_classifier(tmp_path)
    f = FeatureMaps(clf, stages=1).train()
    assert not f.training and not any(p.requires_grad for p in f.parameters())
    assert f(_images(n=2, s=16)).shape == (2, 16, 8, 8)


def test_pretrained_encoder_frozen_then_unfrozen(tmp_path):
    from minidiffusion.learner import Callback
    from minidiffusion.recipes.superres import SuperResTrainConfig, superres_learner

    clf = _tiny_classifier(tmp_path)
    body = {k[5:]: v.clone() for k, v in clf.state_dict().items() if k.startswith("body.")}
    cfg = apply_overrides(SuperResTrainConfig(), [f"encoder={tmp_path}", f"perceptual={tmp_path}", "image_size=16",
                                                  "batch_size=4", "epochs=2", "freeze_epochs=1", "device=cpu",
                                                  "lr=1e-2", "perceptual_stages=1"])
    data = (torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8), torch.randint(0, 256, (4, 3, 16, 16),
                                                                                    dtype=torch.uint8))
    seen = {}

    class Snapshot(Callback):
        order = 100

        def after_epoch(self, learn):
            if learn.training:
                seen[learn.epoch] = ({k: v.clone() for k, v in learn.model.encoder.state_dict().items()},
                                     {k: v.clone() for k, v in learn.model.up.state_dict().items()})

    learn = superres_learner(cfg, progress=False, data=data)
    assert learn.sr_config.model.channels == (8, 16, 32) and learn.sr_config.model.preact
    assert all(torch.equal(learn.model.encoder.state_dict()[k], v) for k, v in body.items())  # loaded
    up0 = {k: v.clone() for k, v in learn.model.up.state_dict().items()}
    learn.fit(2, cbs=[Snapshot()])
    enc1, up1 = seen[0]
    assert all(torch.equal(enc1[k], v) for k, v in body.items())  # epoch 1: weights and BN statistics unchanged
    assert any(not torch.equal(up1[k], v) for k, v in up0.items() if v.is_floating_point())  # the decoder trained
    enc2, _ = seen[1]
    assert any(not torch.equal(enc2[k], body[k]) for k in body if body[k].is_floating_point())  # epoch 2: trains
    assert all(p.requires_grad for p in learn.model.parameters())


def test_sharpness_is_one_for_the_original_and_lower_when_blurred():
    from minidiffusion.metrics.image_quality import sharpness

    x = torch.rand(3, 3, 32, 32) * 2 - 1
    assert torch.allclose(sharpness(x, x), torch.ones(3, dtype=torch.float64))
    assert (sharpness(degrade(x), x) < 0.5).all()  # bicubic x2 loses most of the finest detail
    # a closed form: a vertical stripe pattern +-a has Laplacian -+4a in the interior, so the ratio is (a/b)^2
    stripes = torch.tensor([1.0, -1.0]).repeat(16).view(1, 1, 1, 32).expand(1, 1, 32, 32)
    assert sharpness(0.5 * stripes, stripes).item() == pytest.approx(0.25)


def _tiny_diffusion_sr():
    from minidiffusion.nn.unet import UNet, UNetConfig
    from minidiffusion.pipelines.superres import DiffusionSRConfig

    cfg = DiffusionSRConfig(model=UNetConfig(in_channels=3, cond_channels=3, channels=(8, 16), blocks=(1, 1),
                                             attention=(False, False), norm_groups=4), steps=3)
    torch.manual_seed(0)
    net = UNet(cfg.model)
    torch.nn.init.normal_(net.out_conv.weight, std=0.1)  # untrained, but not the zero-output init
    return cfg, net


def test_diffusion_upscaler_samples_a_residual_on_bicubic_saves_and_loads(tmp_path):
    from minidiffusion.nn.unet import UNetConfig
    from minidiffusion.pipelines.superres import DIFFUSION_KIND, DiffusionSRConfig, save_upscaler

    cfg, net = _tiny_diffusion_sr()
    up = Upscaler(net, cfg)
    low = downscale(_images(n=2, s=32))
    a, b = up.upscale_batch(low), up.upscale_batch(low)
    assert a.shape == (2, 3, 32, 32) and torch.equal(a, b)  # seeded: the same image twice
    assert not torch.equal(a, up.bicubic(low)) and a.min() >= -1 and a.max() <= 1
    # the residual is added to bicubic: from an untrained net it is small beside the starting noise (sigma_max 10)
    assert (a - up.bicubic(low)).abs().max() < 1.0
    path = save_upscaler(net, cfg, tmp_path / "sr.safetensors")
    assert component_kind(path) == DIFFUSION_KIND
    again = Upscaler.from_file(path)
    assert again.diffusion and torch.equal(again.upscale_batch(low), a)
    with pytest.raises(ValueError, match="pass image_cond= of shape"):
        net(torch.zeros(1, 3, 8, 8), torch.zeros(1))
    with pytest.raises(ConfigError, match="cond_channels = model.in_channels"):
        DiffusionSRConfig(model=UNetConfig(in_channels=3, cond_channels=0))


def test_config_refusals():
    from minidiffusion.recipes.superres import SuperResTrainConfig

    with pytest.raises(ConfigError, match="data"):
        SuperResTrainConfig(data="cifar")
    with pytest.raises(ConfigError, match="multiple"):
        SuperResTrainConfig(image_size=60)
    from minidiffusion.recipes.superres import SuperResDiffusionTrainConfig

    with pytest.raises(ConfigError, match="drop perceptual= and encoder="):
        SuperResDiffusionTrainConfig(perceptual="sprites-classifier")
    with pytest.raises(ConfigError, match="log_mse"):
        SuperResTrainConfig(loss="l1")


def test_log_mse_is_the_mean_psnr_up_to_a_constant():
    from minidiffusion.recipes.superres import LOG_MSE_FLOOR, log_mse

    x = torch.rand(2, 3, 8, 8) * 2 - 1
    pred = x.clone()
    pred[0] += 0.1  # one image 20 dB off, the other exact
    mse0 = 0.01
    expected = (math.log(mse0 + LOG_MSE_FLOOR) + math.log(LOG_MSE_FLOOR)) / 2
    assert float(log_mse(pred, x)) == pytest.approx(expected, rel=1e-4)
    noisy = (x + 0.05 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))).clamp(-1, 1)
    mean_psnr = float(psnr(noisy, x).mean())  # errors far above the floor
    assert float(log_mse(noisy, x)) == pytest.approx(math.log(4) - mean_psnr * math.log(10) / 10,
                                                                     abs=0.01)


def test_log_mse_weights_are_its_derivative_per_squared_error():
    from minidiffusion.recipes.superres import log_mse, log_mse_weights

    g = torch.Generator().manual_seed(1)
    x = torch.rand(3, 3, 8, 8, generator=g) * 2 - 1
    pred = (x + torch.randn(x.shape, generator=g) * torch.tensor([0.3, 0.03, 0.003]).view(3, 1, 1, 1)).requires_grad_()
    log_mse(pred, x).backward()
    # d/dpred of mean_i log(MSE_i + floor) = w_i * 2 (pred - x) / (B * C * H * W)
    expected = log_mse_weights(pred.detach(), x).view(3, 1, 1, 1) * 2 * (pred.detach() - x) / pred.numel()
    torch.testing.assert_close(pred.grad, expected)
    w = log_mse_weights(pred.detach(), x)
    assert w[0] < w[1] < w[2]  # the more exact an image, the more its remaining error weighs


@pytest.mark.integration
def test_train_upscale_and_eval_end_to_end(tmp_path, capsys):
    from minidiffusion.recipes import train

    run = tmp_path / "run"
    settings = ["epochs=1", "n_crops=64", "train_limit=32", "valid_limit=16", "eval_n=16", "batch_size=16",
                "model.channels=[8,16,32]", "model.blocks=[1,1]", "model.project=true", "loss=log_mse"]
    result = train("photos-sr-unet", run, settings, progress=False)
    assert result["recipe"] == "superres" and result["n"] == 16
    assert math.isfinite(result["psnr"]) and result["psnr_bicubic"] > 20
    for name in ("model.safetensors", "model.toml", "samples.png", "metrics.jsonl"):
        assert (run / name).is_file()
    Image.fromarray((np.random.default_rng(1).random((40, 52)) * 255).astype(np.uint8)).save(tmp_path / "g.png")
    assert main(["upscale", str(tmp_path / "g.png"), "--run", str(run), "--out", str(tmp_path / "g2.png"),
                 "--tile", "16", "--overlap", "8"]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["output_size"] == [104, 80] and Image.open(tmp_path / "g2.png").mode == "L"
    assert main(["eval", str(run), "--n", "8", "--device", "cpu"]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["n"] == 8 and "psnr_gain" in line and line["data"] == "photos"
    assert upscale_file(tmp_path / "g.png", tmp_path / "g3.png", run=run)["mode"] == "L"
    assert main(["upscale", str(tmp_path / "missing.png"), "--run", str(run), "--out", str(tmp_path / "x.png")]) == 2


@pytest.mark.integration
def test_diffusion_super_resolution_trains_upscales_and_evaluates(tmp_path, capsys):
    from minidiffusion.recipes import train

    run = tmp_path / "run"
    settings = ["epochs=1", "n_crops=64", "train_limit=32", "valid_limit=16", "eval_n=8", "batch_size=16",
                "model.model.channels=[8,16]", "model.model.blocks=[1,1]", "model.model.attention=[false,false]",
                "model.model.norm_groups=4", "model.steps=2"]
    result = train("photos-sr-diffusion", run, settings, progress=False)
    assert result["recipe"] == "superres_diffusion" and result["n"] == 8 and math.isfinite(result["valid_loss"])
    assert math.isfinite(result["psnr"]) and 0 < result["sharpness"] and result["sharpness_bicubic"] < 1
    assert (run / "samples.png").is_file()
    assert main(["eval", str(run), "--n", "4", "--device", "cpu"]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["n"] == 4 and "sharpness" in line
    Image.fromarray((np.random.default_rng(1).random((20, 24, 3)) * 255).astype(np.uint8)).save(tmp_path / "c.png")
    assert main(["upscale", str(tmp_path / "c.png"), "--run", str(run), "--out", str(tmp_path / "c2.png")]) == 0
    assert Image.open(tmp_path / "c2.png").size == (48, 40)


@pytest.mark.integration
def test_the_shipped_models_load_and_work():
    from minidiffusion.data.images import uint8_to_float
    from minidiffusion.data.sprites import load_sprites
    from minidiffusion.pipelines.superres import evaluate_upscaler_on, shipped_upscalers
    from minidiffusion.recipes.superres import load_classifier

    assert "photos-sr2" in shipped_upscalers()
    model = Upscaler.from_pretrained("photos-sr2")
    r = evaluate_upscaler_on(model, "photos", n=32)
    assert r["n"] == 32 and r["psnr"] > 25 and r["ssim"] > 0.8
    assert r["psnr_gain"] > 0.5 and r["ssim"] > r["ssim_bicubic"]  # it beats bicubic (by 1.55 dB on 512 crops)
    clf = load_classifier("sprites-classifier")
    test = load_sprites("test")
    with torch.no_grad():
        pred = clf(uint8_to_float(test.images[:256])).argmax(1)
    assert (pred == test.labels[:256]).float().mean() > 0.5  # 20 classes: chance is 5%; 71% on all 893
    with pytest.raises(ConfigError, match="no pretrained upscaler"):
        Upscaler.from_pretrained("nope")

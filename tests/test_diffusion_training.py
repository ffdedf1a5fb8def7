"""Diffusion training through the Learner, and the sampling pipeline a user calls."""

import json

import pytest
import torch

from minidiffusion.config import apply_overrides
from minidiffusion.data.loaders import DataLoaders, TensorLoader
from minidiffusion.diffusion.config import build_objective
from minidiffusion.errors import CheckpointError, ConfigError
from minidiffusion.learner import Learner, MetricsCB
from minidiffusion.nn.unet import UNet
from minidiffusion.pipelines.image import DiffusionModel, save_model
from minidiffusion.recipes.callbacks import DiffusionCB
from minidiffusion.recipes.diffusion import DiffusionConfig, train_diffusion

TINY = ["model.channels=[8, 16]", "model.blocks=[1, 1]", "model.attention=[false, true]", "model.mid_blocks=1",
        "model.head_dim=8", "model.norm_groups=4"]


def _cfg(*extra, objective="edm"):
    return apply_overrides(DiffusionConfig(), [*TINY, f"objective={objective}", "model.n_classes=3", *extra])


def _model(cfg, seed=0):
    torch.manual_seed(seed)
    net = UNet(cfg.model)
    for p in net.parameters():  # leave the zero-init so outputs depend on inputs
        if p.abs().sum() == 0:
            torch.nn.init.normal_(p, std=0.02)
    return DiffusionModel(net, cfg, ["a", "b", "c/cc"])


def _blobs(n=96, seed=0):
    """Images in [-1, 1]: a bright square whose position is the label (3 classes)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    x = torch.full((n, 1, 8, 8), -1.0)
    for i, lab in enumerate(y.tolist()):
        x[i, :, 1 + 2 * lab: 3 + 2 * lab, 2:6] = 1.0
    return x, y


@pytest.mark.parametrize("objective", ["ddpm", "cosine", "edm"])
def test_diffusion_callback_trains_the_unet(objective):
    torch.manual_seed(0)
    cfg = _cfg(objective=objective)
    x, y = _blobs()
    dls = DataLoaders(TensorLoader(x, y, batch_size=32, shuffle=True), TensorLoader(x, y, batch_size=96))
    net = UNet(cfg.model)
    cb = DiffusionCB(build_objective(cfg), n_classes=3, cond_drop=0.2)
    metrics = MetricsCB()
    Learner(net, dls, lr=3e-3, cbs=[cb, metrics]).fit(8)
    valid = [r["loss"] for r in metrics.history if r["phase"] == "valid"]
    assert valid[-1] < 0.8 * valid[0], valid


def test_validation_loss_uses_fixed_noise():
    cfg = _cfg()
    x, y = _blobs()
    dls = DataLoaders(TensorLoader(x, y, batch_size=32), TensorLoader(x, y, batch_size=96))
    net = UNet(cfg.model)
    metrics = MetricsCB()
    Learner(net, dls, lr=0.0, cbs=[DiffusionCB(build_objective(cfg), 3), metrics]).fit(2)
    valid = [r["loss"] for r in metrics.history if r["phase"] == "valid"]
    assert valid[0] == pytest.approx(valid[1], rel=1e-6)  # lr=0: same weights, same noise -> same loss


def test_label_dropout_reaches_the_network():
    cfg = _cfg()
    seen = []

    class Spy(torch.nn.Module):
        def forward(self, x, level, label=None):
            seen.append(label.clone())
            return torch.zeros_like(x)

    class L:  # the fields of a Learner that DiffusionCB reads
        training = True
        model = Spy()
        batch = _blobs(4000)

    cb = DiffusionCB(build_objective(cfg), n_classes=3, cond_drop=0.25)
    cb._valid_gen = None
    cb.predict(L)
    frac = (seen[0] == 3).float().mean().item()
    assert 0.22 < frac < 0.28


def test_sampling_sigmas_follow_the_objective():
    ddpm = build_objective(_cfg(objective="ddpm"))
    lo, hi = ddpm.sigma_range()
    assert lo == pytest.approx((1e-4 / (1 - 1e-4)) ** 0.5, rel=1e-6) and 150 < hi < 160
    s = ddpm.sampling_sigmas(10, "ddim")
    assert len(s) == 11 and s[-1] == 0 and float(s[0]) == pytest.approx(hi)  # trailing spacing starts at T-1
    k = build_objective(_cfg()).sampling_sigmas(10, "dpmpp_2m")
    assert float(k[0]) == pytest.approx(80.0) and float(k[-2]) == pytest.approx(0.002)


def test_the_pipeline_samples_on_a_chosen_schedule():
    dm = _model(_cfg("image_size=8"))
    assert torch.equal(dm.sigmas(6, "dpmpp_2m"), dm.objective.sampling_sigmas(6, "dpmpp_2m"))
    e = dm.sigmas(6, "dpmpp_2m", "exponential")
    assert e[-1] == 0 and torch.allclose(e[:-1].log().diff(), e[:-1].log().diff()[0].expand(5))  # uniform in log
    assert torch.equal(dm.sigmas(10, "dpmpp_2m", "auto"), dm.sigmas(10, "dpmpp_2m", "exponential"))
    assert torch.equal(dm.sigmas(6, "dpmpp_2m", "auto"), dm.sigmas(6, "dpmpp_2m", "karras"))  # below 8 NFE
    assert torch.equal(dm.sigmas(6, "heun", "auto"), dm.sigmas(6, "heun", "karras"))
    a, _ = dm.sample(2, sampler="euler", steps=3, schedule="exponential")
    b, _ = dm.sample(2, sampler="euler", steps=3)
    assert not torch.equal(a, b)
    with pytest.raises(ConfigError, match="schedule"):
        dm.sample(2, steps=3, schedule="linear")


def test_sample_shapes_range_determinism_and_labels():
    dm = _model(_cfg("image_size=8"))
    a, ids = dm.sample(6, sampler="euler", steps=3, seed=1)
    b, _ = dm.sample(6, sampler="euler", steps=3, seed=1)
    c, _ = dm.sample(6, sampler="euler", steps=3, seed=2)
    assert a.shape == (6, 1, 8, 8) and a.min() >= -1 and a.max() <= 1
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert ids.tolist() == [0, 1, 2, 0, 1, 2]  # balanced when no label is given
    _, ids = dm.sample(3, sampler="euler", steps=2, labels=["cc", "B", 0])
    assert ids.tolist() == [2, 1, 0]
    with pytest.raises(ConfigError, match="unknown label"):
        dm.label_ids(["zebra"], 1)


def test_bf16_sampling_runs_the_network_in_bf16_and_stays_close_to_fp32():
    dm = _model(_cfg("image_size=8"))
    seen = []
    dm.net.register_forward_hook(lambda m, i, out: seen.append(out.dtype))
    full, _ = dm.sample(4, sampler="dpmpp_2m", steps=4, seed=3)
    assert set(seen) == {torch.float32}
    seen.clear()
    half, _ = dm.sample(4, sampler="dpmpp_2m", steps=4, seed=3, precision="bf16")
    assert set(seen) == {torch.bfloat16} and half.dtype == torch.float32
    assert 0 < (half - full).abs().max() < 0.1  # bf16 has 8 bits of mantissa: close, not equal
    with pytest.raises(ConfigError, match="precision must be"):
        dm.sample(1, steps=1, precision="half")


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_clip_sample_clamps_every_estimate_and_only_then(guidance, tmp_path):
    cfg = _cfg("image_size=8", objective="ddpm")
    dm = _model(cfg)  # random weights: eps-prediction errors times sigma (up to 157) give wild estimates
    seen = []
    dm.sample(2, sampler="ddim", steps=4, guidance=guidance, callback=lambda info: seen.append(info["denoised"]))
    assert max(d.abs().max() for d in seen) > 2
    clipped = _model(apply_overrides(cfg, ["clip_sample=true"]))
    seen.clear()
    clipped.sample(2, sampler="ddim", steps=4, guidance=guidance, callback=lambda info: seen.append(info["denoised"]))
    assert len(seen) == 4 and max(d.abs().max() for d in seen) <= 1
    assert any(d.abs().max() == 1 for d in seen)  # it did clamp something
    save_model(clipped.net, clipped.cfg, clipped.class_names, tmp_path / "model.safetensors")
    assert DiffusionModel.from_run(tmp_path).cfg.clip_sample is True  # the sampling default travels with the model
    clipped.vae = torch.nn.Identity()
    with pytest.raises(ConfigError, match="samples latents"):
        clipped.sample(1, steps=1)
    with pytest.raises(ConfigError, match="'clip_sample' expects bool"):
        apply_overrides(cfg, ['clip_sample="yes"'])
    with pytest.raises(ConfigError, match="clip_sample must be true or false"):
        DiffusionConfig(clip_sample="yes")


def test_clip_sample_clamps_the_steered_estimate_and_the_scorer_sees_a_clamped_one():
    clipped = _model(apply_overrides(_cfg("image_size=8", objective="ddpm"), ["clip_sample=true"]))
    inner, outer = [], []

    def steer(den, ids):  # a steer that pushes far out of range, as a large gradient-guidance scale would
        def steered(x, sigma, **kw):
            d = den(x, sigma, **kw)
            inner.append(d)
            return d + 5.0
        return steered

    clipped.sample(2, sampler="ddim", steps=3, steer=steer, callback=lambda info: outer.append(info["denoised"]))
    assert len(inner) == 3 and max(d.abs().max() for d in inner) <= 1
    assert len(outer) == 3 and all(torch.equal(d, torch.ones_like(d)) for d in outer)


def test_guidance_batches_both_branches_in_one_call():
    dm = _model(_cfg("image_size=8"))
    calls = []
    real = dm.net.forward

    def spy(x, level, label=None):
        calls.append(len(x))
        return real(x, level, label)

    dm.net.forward = spy
    dm.sample(4, sampler="euler", steps=3, guidance=3.0)
    assert calls == [8, 8, 8]  # uncond + cond in one batch, every step
    calls.clear()
    dm.sample(4, sampler="euler", steps=3, guidance=1.0)
    assert calls == [4, 4, 4]


def test_model_file_round_trip_and_refusals(tmp_path):
    cfg = _cfg("image_size=8")
    dm = _model(cfg)
    path = save_model(dm.net, cfg, dm.class_names, tmp_path / "model.safetensors")
    back = DiffusionModel.from_run(tmp_path)
    assert back.class_names == ["a", "b", "c/cc"]
    x1, _ = dm.sample(2, sampler="heun", steps=3)
    x2, _ = back.sample(2, sampler="heun", steps=3)
    assert torch.equal(x1, x2)
    (tmp_path / "model.pt").write_bytes(b"not really")
    with pytest.raises(CheckpointError, match="safetensors"):
        DiffusionModel.from_file(tmp_path / "model.pt")
    with pytest.raises(CheckpointError, match="does not exist: it is no run directory with a model.safetensors"):
        DiffusionModel.from_run(tmp_path / "empty")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="holds no model.safetensors"):
        DiffusionModel.from_run(tmp_path / "empty")
    assert path.with_suffix(".toml").is_file()


def test_progression_png(tmp_path):
    from PIL import Image

    dm = _model(_cfg("image_size=8"))
    p = dm.progression(tmp_path / "prog.png", n=2, frames=3, sampler="euler", steps=5)
    img = Image.open(p)
    assert img.width > img.height  # rows: samples; columns: 3 predictions + the final image


@pytest.mark.integration
def test_real_fashion_mnist_training_run(tmp_path, fashion_mnist_dir, monkeypatch):
    """A short real run on Fashion-MNIST: the loss falls and the run directory is complete."""
    monkeypatch.setenv("MINIDIFFUSION_DATA", str(fashion_mnist_dir))
    cfg = apply_overrides(DiffusionConfig(), [*TINY, "model.norm_groups=8", "epochs=2", "train_limit=1024",
                                              "batch_size=64", "steps=4", "lr=3e-3"])
    result = train_diffusion(cfg, tmp_path / "run", progress=False)
    run = tmp_path / "run"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r["loss"] for r in records if r["phase"] == "train"]
    assert train[-1] < train[0], train
    for name in ("config.toml", "model.safetensors", "model.toml", "samples.png"):
        assert (run / name).is_file(), name
    assert result["steps"] == 2 * 16
    dm = DiffusionModel.from_run(run)
    assert dm.class_names[7] == "Sneaker" and dm.cfg.model.n_classes == 10


def test_train_on_a_folder_of_images(tmp_path, monkeypatch):
    """`data=PATH`: class sub-folders become labels, images are resized, the run directory is complete."""
    from PIL import Image

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    g = torch.Generator().manual_seed(0)
    for cls in ("circles", "squares"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(12):
            arr = (torch.rand(20, 20, 3, generator=g) * 255).to(torch.uint8).numpy()
            Image.fromarray(arr, "RGB").save(tmp_path / "imgs" / cls / f"{i}.png")
    cfg = apply_overrides(DiffusionConfig(), [*TINY, f"data={tmp_path / 'imgs'}", "image_size=8", "epochs=1",
                                              "batch_size=8", "steps=2"])
    result = train_diffusion(cfg, tmp_path / "run", progress=False)
    dm = DiffusionModel.from_run(tmp_path / "run")
    assert dm.class_names == ["circles", "squares"] and dm.cfg.model.in_channels == 3
    x, _ = dm.sample(2, labels=["squares"], steps=2)
    assert x.shape == (2, 3, 8, 8)
    assert result["steps"] > 0 and (tmp_path / "run" / "samples.png").is_file()
    # Resuming: the data completes the config (3 channels, 2 classes) the same way, so it matches ...
    again = apply_overrides(DiffusionConfig(), [*TINY, f"data={tmp_path / 'imgs'}", "image_size=8", "epochs=1",
                                                "batch_size=8", "steps=2"])
    assert train_diffusion(again, tmp_path / "run", resume=True, progress=False)["steps"] == result["steps"]
    # ... and a different setting is refused instead of silently continuing another recipe.
    other = apply_overrides(DiffusionConfig(), [*TINY, f"data={tmp_path / 'imgs'}", "image_size=8", "epochs=1",
                                                "batch_size=8", "steps=2", "lr=0.5"])
    with pytest.raises(ConfigError, match=r"cannot resume .*\(lr: run 0.002, now 0.5\)"):
        train_diffusion(other, tmp_path / "run", resume=True, progress=False)

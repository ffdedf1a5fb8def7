"""Evaluation end to end: the eval command scores samples against the real test set, with its floor."""

import json

import pytest
import torch

from minidiffusion.cli import main
from minidiffusion.config import apply_overrides
from minidiffusion.metrics.evaluate import evaluate_samples, real_images, reference_features
from minidiffusion.metrics.features import load_feature_network
from minidiffusion.nn.unet import UNet
from minidiffusion.pipelines.image import save_model
from minidiffusion.recipes.diffusion import DiffusionConfig


@pytest.mark.integration
def test_reals_score_near_floor_and_noise_scores_far(tiny_features, fashion_mnist_dir, monkeypatch, tmp_path):
    monkeypatch.setenv("MINIDIFFUSION_DATA", str(fashion_mnist_dir))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    net = load_feature_network(tiny_features)
    reals, _ = real_images("train", 500, seed=1)
    good = evaluate_samples(reals, net, seed=1)
    noise = torch.rand(500, 1, 32, 32) * 2 - 1
    bad = evaluate_samples(noise, net, seed=1, with_reals=False)
    assert evaluate_samples(noise, net, seed=1, with_reals=False, reference=reference_features(net)) == bad
    assert evaluate_samples(noise, net, seed=1, with_reals=False, reference=reference_features(net)[:2000]) != bad
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
    assert main(["eval", str(run), "--n", "100", "--steps", "2", "--sampler", "euler", "--schedule", "exponential",
                 "--features", str(tiny_features)]) == 0
    other = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert other["schedule"] == "exponential" and other["nfe"] == 2
    for name, extra in (("default", []), ("cosine", ["--schedule", "cosine"])):
        assert main(["sample", str(run), "--n", "2", "--steps", "3", "--sampler", "euler",
                     "--out", str(tmp_path / f"{name}.png"), *extra]) == 0
        assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]).get("schedule") == (extra or [0, None])[1]
    import numpy as np

    a, b = (np.load(tmp_path / f"{name}.npz")["images"] for name in ("default", "cosine"))
    assert not np.array_equal(a, b)  # other sigmas, other samples


@pytest.mark.integration
def test_fid_callback_scores_every_k_epochs_and_the_final_weights(tiny_features, fashion_mnist_dir, monkeypatch,
                                                                  tmp_path):
    from minidiffusion.data.loaders import DataLoaders, TensorLoader
    from minidiffusion.recipes.callbacks import FIDCB
    from minidiffusion.recipes.diffusion import diffusion_learner

    monkeypatch.setenv("MINIDIFFUSION_DATA", str(fashion_mnist_dir))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    cfg = apply_overrides(DiffusionConfig(), ["model.channels=[8, 16]", "model.blocks=[1, 1]",
                                              "model.attention=[false, false]", "model.norm_groups=4",
                                              "model.n_classes=10", "epochs=3", "fid_every=2", "fid_n=40",
                                              "steps=2", "sampler=euler", "channels_last=false"])
    x, y = real_images("train", 64, seed=0)
    dls = DataLoaders(TensorLoader(x, y, batch_size=32, shuffle=True), TensorLoader(x, y, batch_size=64))
    torch.manual_seed(0)
    learn = diffusion_learner(cfg, UNet(cfg.model), dls, torch.device("cpu"), out=tmp_path, progress=False)
    fid_cb = learn.cb(FIDCB)
    fid_cb.feature_net = load_feature_network(tiny_features, allow_unusual=True)  # an untrained U-Net samples grey
    learn.fit(3)
    assert [r["epoch"] for r in fid_cb.history] == [1, 2]  # epoch 2 (index 1), then the final weights
    assert [r["step"] for r in fid_cb.history] == [4, 6]
    assert all(r["fid"] > 0 and r["n"] == 40 for r in fid_cb.history)
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["fid"] for r in logged if r["phase"] == "fid"] == [r["fid"] for r in fid_cb.history]
    png = (tmp_path / "loss.png").read_bytes()
    assert int.from_bytes(png[16:20], "big") > int.from_bytes(png[20:24], "big") * 2  # loss and FID side by side
    before = torch.get_rng_state()
    again = fid_cb.score(learn)
    assert torch.equal(torch.get_rng_state(), before)  # sampling never touches the global RNG (exact resume)
    assert again["fid"] == pytest.approx(fid_cb.history[-2]["fid"])  # same weights, same seed, same score
    restored = FIDCB(fid_cb.sample, n=40)
    restored.load_state_dict(fid_cb.state_dict())
    assert [r["fid"] for r in restored.history] == pytest.approx([r["fid"] for r in fid_cb.history])


def test_fid_during_training_needs_fashion_mnist(tmp_path):
    from minidiffusion.errors import ConfigError

    with pytest.raises(ConfigError, match="fid_every needs data=fashion-mnist"):
        apply_overrides(DiffusionConfig(), [f"data={tmp_path}", "fid_every=1"])
    with pytest.raises(ConfigError, match="fid_n"):
        apply_overrides(DiffusionConfig(), ["fid_n=1"])

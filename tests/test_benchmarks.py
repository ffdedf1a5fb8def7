"""The benchmark scripts run end to end on tiny settings: their tables, JSON, plots and merging."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from minidiffusion.config import apply_overrides, from_dict, load_preset
from minidiffusion.errors import CheckpointError
from minidiffusion.metrics.features import load_feature_network
from minidiffusion.nn.unet import UNet
from minidiffusion.pipelines.image import DiffusionModel, save_model
from minidiffusion.recipes.diffusion import DiffusionConfig

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
TINY = ["model.channels=[8, 16]", "model.blocks=[1, 1]", "model.attention=[false, false]", "model.norm_groups=4"]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _tiny_model() -> DiffusionModel:
    cfg = apply_overrides(DiffusionConfig(), [*TINY, "model.n_classes=10"])
    torch.manual_seed(0)
    net = UNet(cfg.model)
    torch.nn.init.normal_(net.out_conv.weight, std=0.5)  # untrained, but not the zero-output init
    return DiffusionModel(net, cfg, [str(i) for i in range(10)])


def test_steps_for_counts_heun_honestly():
    bench = _load("samplers")
    assert bench.steps_for("euler", 10) == 10 and bench.steps_for("heun", 10) == 5  # 2*5-1 = 9 NFE <= 10
    assert bench.steps_for("heun", 1) == 1


def test_sampler_table_puts_heun_under_its_budget():
    bench = _load("samplers")
    row = lambda s, b, n, fid: {"sampler": s, "budget": b, "steps": (n + 1) // 2 if s == "heun" else n,  # noqa: E731
                                "nfe": n, "fid": fid, "kid": 1e-3}
    rows = [row("ddim", 10, 10, 0.3), row("ddim", 20, 20, 0.2), row("heun", 10, 9, 1.2), row("heun", 20, 19, 0.4)]
    table = bench.markdown({"rows": rows, "floor": {"fid": 0.05, "kid": 0.0}}, 500)
    header, _, ddim, heun = table.splitlines()[:4]
    assert header == "| sampler | NFE 10 | NFE 20 |"
    assert ddim == "| ddim | 0.30 / 1.0 | 0.20 / 1.0 |"
    assert heun == "| heun | 1.20 / 1.0 (9) | 0.40 / 1.0 (19) |"
    # A schedule other than the model's own is a row of its own, named.
    rows.append({**row("ddim", 10, 10, 0.25), "schedule": "exponential"})
    assert table != (table := bench.markdown({"rows": rows, "floor": {"fid": 0.05, "kid": 0.0}}, 500))
    assert "| ddim (exponential) | 0.25 / 1.0 |  |" in table.splitlines()


@pytest.mark.integration
def test_sampler_benchmark_rows_table_plot_and_render(tiny_features, fashion_mnist_dir, monkeypatch, tmp_path):
    monkeypatch.setenv("MINIDIFFUSION_DATA", str(fashion_mnist_dir))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    bench = _load("samplers")
    saved = []
    result = bench.run(_tiny_model(), ["euler", "heun"], [2, 4], n=40, seed=0,
                       features=load_feature_network(tiny_features), ddpm_1000=False, on_row=saved.append)
    rows = result["rows"]
    assert [(r["sampler"], r["nfe"]) for r in rows] == [("euler", 2), ("euler", 4), ("heun", 1), ("heun", 3)]
    assert len(saved) == 4 and saved[-1]["rows"] == rows  # every row is saved as it comes
    assert all(r["fid"] > result["floor"]["fid"] for r in rows)  # an untrained model is worse than reals
    table = bench.markdown(result, 40)
    assert "| euler |" in table and "| heun |" in table and "N = 40" in table
    bench.plot(result, tmp_path / "fid.png")
    assert (tmp_path / "fid.png").read_bytes()[:4] == b"\x89PNG"
    a = {"model": "m", "n": 40, "seed": 0, **result}
    b = {**a, "rows": [{**rows[0], "sampler": "ddim"}]}
    assert len(bench.merge([a, b])["rows"]) == 5
    with pytest.raises(SystemExit, match="one model at one N"):
        bench.merge([a, {**b, "n": 80}])
    paths = []
    for i, r in enumerate((a, b)):
        paths.append(tmp_path / f"{i}.json")
        paths[-1].write_text(json.dumps(r))
    monkeypatch.setattr("sys.argv", ["samplers.py", "--render", *map(str, paths), "--plot", str(tmp_path / "m.png")])
    bench.main()
    assert (tmp_path / "m.png").is_file()


@pytest.mark.integration
def test_vs_course_trains_both_networks_for_a_budget(fashion_mnist_dir, monkeypatch):
    monkeypatch.setenv("MINIDIFFUSION_DATA", str(fashion_mnist_dir))
    bench = _load("vs_course")
    net = bench.course_network()
    assert 15.5e6 < sum(p.numel() for p in net.parameters()) < 16.5e6  # the lesson-19 UNet2DModel
    assert net(torch.randn(2, 1, 32, 32), torch.tensor([10.0, 500.0])).shape == (2, 1, 32, 32)
    cfg = apply_overrides(DiffusionConfig(), [*TINY, "minutes=0.02", "batch_size=16", "train_limit=256",
                                              "channels_last=false"])
    model, info = bench.train_for(cfg, None, torch.device("cpu"))
    assert info["steps"] > 0 and info["images"] == 16 * info["steps"] and 1.0 <= info["train_seconds"] < 5
    x, ids = model.sample(4, steps=2)
    assert x.shape == (4, 1, 32, 32) and ids.tolist() == [0, 1, 2, 3]


def test_vs_course_reloads_a_saved_course_network(tmp_path):
    """--parallel hands the course's diffusers net from its training process over through save_model."""
    bench = _load("vs_course")
    cfg = apply_overrides(from_dict(DiffusionConfig, load_preset("fmnist-ddpm")), ["sampler=ddim", "steps=100"])
    torch.manual_seed(0)
    net = bench.course_network().eval()
    weights = save_model(net, cfg, None, tmp_path / "course" / "model.safetensors")
    torch.manual_seed(1)
    model = DiffusionModel.from_file(weights, net=bench.course_network())
    x, t = torch.randn(2, 1, 32, 32), torch.tensor([10.0, 500.0])
    with torch.no_grad():
        assert not torch.equal(bench.course_network().eval()(x, t), net(x, t))  # a fresh net differs...
        assert torch.allclose(model.net(x, t), net(x, t), atol=1e-5)  # ...the reloaded one is the saved one
    assert model.nfe() == 100 and model.cfg.objective == cfg.objective
    with pytest.raises(CheckpointError, match="with its config .* does not match the model"):
        DiffusionModel.from_file(weights)  # our UNet is not the network these weights belong to


def test_vs_course_parallel_needs_a_save_folder(monkeypatch, capsys):
    bench = _load("vs_course")
    monkeypatch.setattr("sys.argv", ["vs_course.py", "--parallel"])
    with pytest.raises(SystemExit) as e:
        bench.main()
    assert e.value.code == 2 and "--parallel needs --save" in capsys.readouterr().err


def test_sampling_speed_times_every_format_and_precision(tmp_path, monkeypatch, capsys):
    bench = _load("sampling_speed")
    out = tmp_path / "speed.json"
    monkeypatch.setattr("sys.argv", ["sampling_speed.py", "--batch", "4", "--iters", "1", "--device", "cpu",
                                     "--json", str(out)])
    bench.main()
    res = json.loads(out.read_text())
    assert res["device"] == "cpu" and res["batch"] == 4
    assert {(r["format"], r["precision"]) for r in res["rows"]} == {
        (f, p) for f in ("NCHW", "channels_last") for p in ("fp32", "bf16")}
    assert all(r["evals_per_s"] > 0 for r in res["rows"])
    assert "| channels_last |" in capsys.readouterr().out


def test_text_to_image_table_and_plot_have_a_row_and_point_per_cell(tmp_path):
    t2i = _load("text_to_image")
    rows = [{"split": s, "n": 8, "guidance": g, "clip_score": c, "kid": k, "fid": 3.0, "kid_reals": 0.001,
             "fid_reals": 1.5} for s, g, c, k in (("test", 1.0, 20.0, 0.02), ("test", 4.0, 25.0, 0.03),
                                                  ("train", 1.0, 22.0, 0.01))]
    reals = {"test": {"clip_score": 27.5, "n": 8}, "train": {"clip_score": 30.0, "n": 8}}
    lines = t2i.table(rows, reals).splitlines()
    assert len(lines) == 2 + 3 and lines[3] == "| test (8) | 4 | 25.00 | 27.50 | 30.0 | 3.00 | 1.0 / 1.50 |"
    t2i.plot(rows, reals, str(tmp_path / "p.png"))
    assert (tmp_path / "p.png").stat().st_size > 1000


def test_steering_saturation_and_personalise_similarities_on_hand_cases():
    steering, personalise = _load("steering"), _load("personalise")
    grey = torch.zeros(2, 3, 4, 4)
    red = torch.cat([torch.ones(1, 1, 4, 4), -torch.ones(1, 2, 4, 4)], 1)
    assert steering.saturation(grey) == 0.0 and steering.saturation(red) == pytest.approx(1.0)

    class Identity:  # a "CLIP" whose image embedding is the flattened, normalised image
        def eval(self):
            return self

        def parameters(self):
            yield torch.zeros(1)

        def encode_image(self, x):
            return torch.nn.functional.normalize(x.flatten(1), dim=1)

    a, b = torch.rand(1, 3, 4, 4) * 2 - 1, torch.rand(1, 3, 4, 4) * 2 - 1
    cos = float(torch.nn.functional.cosine_similarity(a.flatten(1), b.flatten(1)))
    assert personalise.similarity(Identity(), a, b) == pytest.approx(100 * cos, rel=1e-5)
    # the concept against itself leaves out each image's match with itself (1.0): here only the pair a, b
    assert personalise.self_similarity(Identity(), torch.cat([a, b])) == pytest.approx(100 * cos, rel=1e-5)


def test_superres_bands_group_crops_by_bicubic_quality():
    from minidiffusion.nn.superres import SuperResConfig, SuperResNet
    from minidiffusion.pipelines.superres import Upscaler

    bands = _load("superres_bands")
    bic = torch.tensor([25.0, 35.0, 47.0, 52.0], dtype=torch.float64)
    net = bic + torch.tensor([1.0, 0.5, -1.0, -3.0], dtype=torch.float64)
    r = bands.row("x", net, bic)
    assert [b["n"] for b in r["bands"]] == [1, 1, 0, 1, 1]
    assert [b["gain"] for b in r["bands"]] == [1.0, 0.5, None, -1.0, -3.0]
    assert r["psnr"] - r["psnr_bicubic"] == pytest.approx(-0.625)
    assert r["psnr_pooled"] > r["psnr_pooled_bicubic"]  # the detailed crops' gains carry the pooled error
    table = bands.markdown([r])
    assert table.count("\n") == 2 and "| `x` |" in table and ">= 50 dB (1 crops)" in table
    net0 = SuperResNet(SuperResConfig(channels=(8, 16), blocks=(1,)))  # identity at init: no gain anywhere
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    ours, base = bands.per_crop(Upscaler(net0.eval(), net0.cfg), x)
    assert torch.equal(ours, base)


def test_denoising_error_scores_each_level_and_the_clamped_sampler():
    bench = _load("denoising_error")
    assert bench.level_indices(100, 5) == [0, 6, 25, 56, 99] and bench.level_indices(3, 8) == [0, 1, 2]
    cfg = apply_overrides(DiffusionConfig(), [*TINY, "objective=ddpm", "image_size=8", "sampler=ddim", "steps=5"])
    torch.manual_seed(0)
    net = UNet(cfg.model)
    torch.nn.init.normal_(net.out_conv.weight, std=0.5)
    model = DiffusionModel(net, cfg)
    x0 = torch.rand(6, 1, 8, 8) * 2 - 1
    rows = bench.errors_by_sigma(model, x0, None, [157.0, 1.0, 0.01])
    want = float((x0 - x0.mean(0, keepdim=True)).pow(2).mean())
    assert all(r["mse_mean"] == pytest.approx(want) for r in rows)
    assert all(r["mse_clamped"] <= r["mse"] for r in rows)
    assert rows[0]["mse"] > 100 * rows[0]["mse_mean"]  # an eps error of ~1 times sigma 157
    assert rows[2]["mse"] < rows[0]["mse"]  # at sigma 0.01 the same error counts 15,700 times less
    runs = {c: bench.sampling_spread(bench.with_clip(model, c), 2, 0.33, [0, 4]) for c in (False, True)}
    assert model.cfg.clip_sample is False  # with_clip copies; the model itself is unchanged
    assert [s for s, _, _ in runs[True]["std"]] == pytest.approx([float(v) for v in model.sigmas(5, "ddim")[[1, 5]]])
    assert 0 <= runs[True]["saturated"] <= 1
    assert bench.saturated(torch.tensor([-1.0, 0.995, 0.5, 1.0])) == 0.5
    table = bench.markdown("tiny", rows, {f"clip_sample={c}": r for c, r in runs.items()}, 0.25)
    assert "| 157 |" in table and "std of x, clip_sample=True" in table
    assert "final pixels above 0.99 (held-out images: 25.0%)" in table

"""Consistency models: the parametrisation's boundary condition, the distance, the grid, the teacher's ODE
step, the few-step sampler, and a distillation run end to end."""

import math

import pytest
import torch

from minidiffusion.config import apply_overrides
from minidiffusion.diffusion import consistency as cm
from minidiffusion.diffusion.samplers import nfe, sample_consistency
from minidiffusion.errors import ConfigError
from minidiffusion.pipelines.image import DiffusionModel
from minidiffusion.recipes.diffusion import DiffusionConfig, train_diffusion
from minidiffusion.recipes.distill import DistillConfig, train_distill

TINY = ["model.channels=[8, 16]", "model.blocks=[1, 1]", "model.attention=[false, true]", "model.mid_blocks=1",
        "model.head_dim=8", "model.norm_groups=8"]


def test_boundary_condition_is_exact():
    c_skip, c_out = cm.consistency_scalings(torch.tensor([0.002, 1.0, 80.0], dtype=torch.float64), 0.5, 0.002)
    assert c_skip[0] == 1 and c_out[0] == 0
    assert 0 < c_skip[1] < 1 and c_skip[2] < 1e-4 and c_out[2] == pytest.approx(0.5 * 79.998 / math.hypot(0.5, 80))
    # Whatever the network says, f(x, sigma_min) = x.
    obj = cm.ConsistencyObjective()
    x = torch.randn(3, 1, 4, 4)
    f = obj.denoiser(lambda x_in, c_noise, **_: torch.randn_like(x_in) * 100)
    assert torch.equal(f(x, torch.full((3,), 0.002)), x)
    assert not torch.allclose(f(x, torch.full((3,), 1.0)), x)


def test_pseudo_huber_is_zero_for_equal_inputs_and_near_l2_far_away():
    a = torch.randn(2, 1, 8, 8)
    assert torch.allclose(cm.pseudo_huber(a, a), torch.zeros(2), atol=1e-7)
    b = a + 10
    assert torch.allclose(cm.pseudo_huber(a, b), (a - b).flatten(1).norm(dim=1), rtol=1e-4)
    assert (cm.pseudo_huber(a, a + 1e-3) > 0).all()


def test_grid_is_ascending_karras_from_sigma_min_to_sigma_max():
    g = cm.consistency_grid(18, 0.002, 80.0)
    assert len(g) == 18 and (g.diff() > 0).all()
    assert g[0].item() == pytest.approx(0.002) and g[-1].item() == pytest.approx(80.0)
    with pytest.raises(ConfigError, match="at least 2"):
        cm.consistency_grid(1, 0.002, 80.0)


def test_heun_step_follows_the_exact_ode_for_gaussian_data():
    """For data ~ N(0, s^2) the ideal denoiser is x s^2/(s^2 + sigma^2) and the ODE keeps x / sqrt(s^2 + sigma^2)."""
    s = 0.5
    denoiser = lambda x, sigma: x * s**2 / (s**2 + sigma.view(-1, 1, 1, 1) ** 2)  # noqa: E731
    x = torch.randn(4, 1, 2, 2, dtype=torch.float64)
    hi, lo = torch.full((4,), 2.0, dtype=torch.float64), torch.full((4,), 1.8, dtype=torch.float64)
    exact = x * math.sqrt(s**2 + 1.8**2) / math.sqrt(s**2 + 2.0**2)
    euler = x + (lo - hi).view(-1, 1, 1, 1) * (x - denoiser(x, hi)) / 2.0
    heun = cm.heun_step(denoiser, x, hi, lo)
    assert (heun - exact).abs().max() < 1e-4 < (euler - exact).abs().max()


def test_consistency_sampler_uses_one_evaluation_per_step():
    calls = []

    def denoiser(x, sigma):
        calls.append(float(sigma[0]))
        return torch.zeros_like(x) + 0.25

    obj = cm.ConsistencyObjective()
    x = torch.randn(2, 1, 4, 4) * 80
    out = sample_consistency(denoiser, x, obj.sampling_sigmas(1, "consistency"))
    assert calls == [80.0] and torch.equal(out, torch.full_like(x, 0.25))
    calls.clear()
    sig = obj.sampling_sigmas(4, "consistency")
    sample_consistency(denoiser, x, sig, generator=torch.Generator().manual_seed(0))
    assert len(calls) == 4 == nfe("consistency", 4) and calls[0] == 80.0 and calls[-1] == pytest.approx(0.2)
    assert (torch.tensor(calls).diff() < 0).all()


def test_distillation_runs_end_to_end_and_refuses_other_samplers(tmp_path, fashion_mnist_dir, monkeypatch):
    monkeypatch.setenv("MINIDIFFUSION_DATA", str(fashion_mnist_dir))
    teacher = apply_overrides(DiffusionConfig(), [*TINY, "epochs=1", "train_limit=256", "valid_limit=64",
                                                  "batch_size=64", "steps=2"])
    train_diffusion(teacher, tmp_path / "teacher", progress=False)
    cfg = apply_overrides(DistillConfig(), [f"teacher={tmp_path / 'teacher'}", "epochs=2", "train_limit=256",
                                            "valid_limit=64", "batch_size=64", "lr=1e-3", "grid=10",
                                            "minutes=0", "steps=2"])
    result = train_distill(cfg, tmp_path / "student", progress=False)
    assert result["steps"] == 2 * 4 and (tmp_path / "student" / "samples.png").is_file()
    dm = DiffusionModel.from_run(tmp_path / "student")
    assert dm.cfg.objective == "consistency" and dm.cfg.model == DiffusionModel.from_run(tmp_path / "teacher").cfg.model
    x, _ = dm.sample(2, labels=["Sneaker"], steps=1, seed=0)
    assert x.shape == (2, 1, 32, 32) and x.min() >= -1 and x.max() <= 1
    with pytest.raises(ConfigError, match="consistency"):
        dm.sample(2, sampler="dpmpp_2m", steps=4)


def test_teacher_must_be_an_edm_model(tmp_path, fashion_mnist_dir, monkeypatch):
    monkeypatch.setenv("MINIDIFFUSION_DATA", str(fashion_mnist_dir))
    teacher = apply_overrides(DiffusionConfig(), [*TINY, "objective=ddpm", "epochs=1", "train_limit=64",
                                                  "valid_limit=64", "batch_size=64", "steps=2"])
    train_diffusion(teacher, tmp_path / "teacher", progress=False)
    cfg = apply_overrides(DistillConfig(), [f"teacher={tmp_path / 'teacher'}", "epochs=1", "minutes=0"])
    with pytest.raises(ConfigError, match="starts from an EDM model"):
        train_distill(cfg, tmp_path / "student", progress=False)
    assert not (tmp_path / "student").exists()


def test_the_shipped_student_jumps_to_the_end_of_its_teachers_trajectory():
    teacher, student = DiffusionModel.from_pretrained("fmnist"), DiffusionModel.from_pretrained("fmnist-fast")
    assert student.objective.name == "consistency" and student.cfg.steps == 2
    one, ids = student.sample(20, steps=1, seed=3)
    assert one.shape == (20, 1, 32, 32) and one.min() >= -1 and one.max() <= 1
    assert ids.tolist() == [i % 10 for i in range(20)]
    end = teacher.sample(20, steps=20, seed=3)[0]  # the same starting noise, the teacher's ODE solved in 20 NFE
    other = teacher.sample(20, steps=20, seed=4)[0]
    assert (one - end).abs().mean() < 0.15 < (other - end).abs().mean()  # measured 0.084 against 0.31
    with pytest.raises(ConfigError, match="samples only with consistency"):
        student.sample(2, sampler="dpmpp_2m")

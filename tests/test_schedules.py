"""Schedules: closed forms, the sigma <-> alpha-bar change of variables, sampling sigma sequences."""

from __future__ import annotations

import math

import pytest
import torch

from minidiffusion.diffusion.samplers import SAMPLERS, nfe
from minidiffusion.diffusion.schedules import (
    SCHEDULES,
    alpha_bar_cosine,
    alpha_bar_from_sigma,
    alpha_bars_linear,
    cosine_t_from_sigma,
    ddpm_betas,
    ddpm_timesteps,
    schedule_for_budget,
    sigma_from_alpha_bar,
    sigma_to_t,
    sigmas_cosine,
    sigmas_ddpm,
    sigmas_exponential,
    sigmas_for_budget,
    sigmas_karras,
    sigmas_lambda_uniform,
    t_to_sigma,
)
from minidiffusion.errors import ConfigError

F64 = torch.float64


def test_ddpm_betas_are_linear_between_the_paper_endpoints():
    betas = ddpm_betas()
    assert betas.shape == (1000,) and betas.dtype == F64
    assert betas[0].item() == pytest.approx(1e-4, rel=1e-12)
    assert betas[-1].item() == pytest.approx(0.02, rel=1e-12)
    assert torch.allclose(betas.diff(), torch.full((999,), (0.02 - 1e-4) / 999, dtype=F64), rtol=1e-9)


def test_alpha_bars_are_the_cumulative_product_of_one_minus_beta():
    betas, abar = ddpm_betas(), alpha_bars_linear()
    assert abar[0].item() == pytest.approx(1 - 1e-4, rel=1e-15)
    assert abar[1].item() == pytest.approx((1 - 1e-4) * (1 - betas[1].item()), rel=1e-14)
    assert abar[-1].item() == pytest.approx(math.prod(1 - b for b in betas.tolist()), rel=1e-10)
    assert abar[-1].item() == pytest.approx(4.04e-5, rel=0.01)  # the well-known value of T = 1000
    assert (abar.diff() < 0).all()


def test_cosine_alpha_bar_closed_forms():
    assert alpha_bar_cosine(0.0).item() == 1.0
    assert alpha_bar_cosine(0.5).item() == pytest.approx(0.5, abs=1e-15)  # cos(pi/4)^2
    t = torch.tensor([0.1, 0.3, 0.7, 0.9], dtype=F64)
    assert torch.allclose(alpha_bar_cosine(t), torch.cos(t * math.pi / 2) ** 2, rtol=1e-14)
    # sigma = tan(t pi / 2) for the plain cosine schedule
    assert torch.allclose(sigma_from_alpha_bar(alpha_bar_cosine(t)), torch.tan(t * math.pi / 2), rtol=1e-12)
    # the Improved-DDPM offset keeps abar(0) = 1 but adds noise sooner (no vanishing betas near t = 0);
    # the clamp bounds abar below
    assert alpha_bar_cosine(0.0, offset=0.008).item() == pytest.approx(1.0, abs=1e-15)
    assert alpha_bar_cosine(0.01, offset=0.008).item() < alpha_bar_cosine(0.01).item()
    assert alpha_bar_cosine(1.0, min_alpha_bar=1e-4).item() == pytest.approx(1e-4)


@pytest.mark.parametrize("offset", [0.0, 0.008])
def test_cosine_t_from_sigma_inverts_the_schedule(offset):
    t = torch.linspace(0.001, 0.99, 50, dtype=F64)
    sigma = sigma_from_alpha_bar(alpha_bar_cosine(t, offset))
    assert torch.allclose(cosine_t_from_sigma(sigma, offset), t, atol=1e-12)
    if offset == 0.0:
        assert torch.allclose(cosine_t_from_sigma(sigma), torch.atan(sigma) * 2 / math.pi, atol=1e-15)


def test_sigma_alpha_bar_round_trip():
    abar = torch.tensor([1e-5, 0.01, 0.5, 0.9, 1 - 1e-4], dtype=F64)
    sigma = sigma_from_alpha_bar(abar)
    assert sigma[2].item() == pytest.approx(1.0)
    assert torch.allclose(alpha_bar_from_sigma(sigma), abar, rtol=1e-13)
    assert torch.allclose(sigma_from_alpha_bar(alpha_bar_from_sigma(sigma)), sigma, rtol=1e-10)
    assert alpha_bar_from_sigma(0.0).item() == 1.0


def test_sigma_to_t_is_exact_on_the_grid_and_interpolates_in_log_sigma():
    abar = alpha_bars_linear()
    sigmas = sigma_from_alpha_bar(abar)
    ts = torch.tensor([0, 1, 17, 500, 998, 999])
    assert torch.equal(sigma_to_t(sigmas[ts], abar), ts.to(F64))  # exact integers, ends included
    mid = torch.sqrt(sigmas[10] * sigmas[11])  # geometric midpoint = halfway in log sigma
    assert sigma_to_t(mid, abar).item() == pytest.approx(10.5, abs=1e-9)
    assert sigma_to_t(mid, abar, quantize=True).item() in (10.0, 11.0)
    # beyond the ends: clamped
    assert sigma_to_t(torch.tensor([1e-6, 1e6]), abar).tolist() == [0.0, 999.0]
    t = torch.linspace(0, 999, 301, dtype=F64)
    assert torch.allclose(sigma_to_t(t_to_sigma(t, abar), abar), t, atol=1e-8)


def test_karras_sigmas_endpoints_monotone_and_length():
    s = sigmas_karras(10, 0.002, 80.0)
    assert s.shape == (11,) and s.dtype == F64
    assert s[0].item() == pytest.approx(80.0, rel=1e-14)
    assert s[-2].item() == pytest.approx(0.002, rel=1e-12)
    assert s[-1].item() == 0.0
    assert (s.diff() < 0).all()
    # EDM eq. 5 at the middle index, by hand
    i, n, rho = 5, 10, 7.0
    expected = (80 ** (1 / rho) + i / (n - 1) * (0.002 ** (1 / rho) - 80 ** (1 / rho))) ** rho
    assert s[5].item() == pytest.approx(expected, rel=1e-13)
    assert sigmas_karras(1, 0.002, 80.0).tolist() == [80.0, 0.0]


def test_karras_rho_moves_steps_to_low_noise():
    uniform, edm, steep = (sigmas_karras(20, 0.002, 80.0, rho=r) for r in (1.0, 7.0, 30.0))
    assert torch.allclose(uniform[:-1], torch.linspace(80.0, 0.002, 20, dtype=F64), rtol=1e-12)
    below_one = [(s[:-1] < 1.0).sum().item() for s in (uniform, edm, steep)]
    assert below_one[0] < below_one[1] < below_one[2]
    # rho -> infinity tends to the exponential (log-uniform) schedule
    log_uniform = sigmas_exponential(20, 0.002, 80.0)
    assert torch.allclose(sigmas_karras(20, 0.002, 80.0, rho=1e6), log_uniform, rtol=1e-4)


def test_exponential_sigmas_are_log_uniform():
    s = sigmas_exponential(8, 0.01, 10.0)
    assert s.shape == (9,) and s[-1].item() == 0.0
    ratios = s[1:-1] / s[:-2]
    assert torch.allclose(ratios, ratios[:1].expand(7), rtol=1e-12)
    assert s[0].item() == pytest.approx(10.0) and s[-2].item() == pytest.approx(0.01)


def test_exponential_sigmas_are_uniform_in_dpm_solvers_lambda():
    """lambda = log(alpha / sigma_VP) = -log sigma: every step has the same h; the alias is the same function."""
    assert sigmas_lambda_uniform is sigmas_exponential
    s = sigmas_exponential(10, 0.002, 80.0)[:-1]
    alpha = 1 / torch.sqrt(1 + s**2)
    lam = torch.log(alpha / (s * alpha))
    assert torch.allclose(lam.diff(), lam.diff()[:1].expand(9), rtol=1e-12)
    assert lam.diff()[0].item() == pytest.approx(math.log(80.0 / 0.002) / 9)


def test_sigmas_for_budget_spend_at_most_the_budget_on_the_family_the_rule_picks():
    for name in SAMPLERS:
        for budget in (3, 10, 20):
            s = sigmas_for_budget(name, budget, 0.01, 50.0)
            steps = len(s) - 1
            assert nfe(name, steps) <= budget < nfe(name, steps + 1)
            family = schedule_for_budget(name, budget)
            assert torch.equal(s, SCHEDULES[family](steps, 0.01, 50.0))
            assert s[0].item() == pytest.approx(50.0) and s[-2].item() == pytest.approx(0.01) and s[-1] == 0
    assert len(sigmas_for_budget("heun", 10)) - 1 == 5  # Heun: 2 calls a step, 1 on the last
    assert len(sigmas_for_budget("dpmpp_2m", 10)) - 1 == 10
    assert schedule_for_budget("heun", 10) == "karras" and schedule_for_budget("euler", 50) == "karras"
    for name in ("dpmpp_2m", "dpmpp_2m_sde", "dpmpp_3m_sde", "dpmpp_2s_ancestral", "unipc", "ipndm"):
        assert schedule_for_budget(name, 10) == "exponential"  # where the benchmark found it better
        assert schedule_for_budget(name, 3) == "karras"  # at 3 NFE Karras' grid wins for every solver
    assert schedule_for_budget("dpmpp_2m", 5) == "karras" and schedule_for_budget("ipndm", 5) == "exponential"
    assert torch.equal(sigmas_for_budget("unipc", 8), sigmas_exponential(8))


def test_cosine_sigmas_are_evenly_spaced_in_t():
    s = sigmas_cosine(12, 0.002, 80.0)
    assert s.shape == (13,) and s[-1].item() == 0.0 and (s.diff() < 0).all()
    assert s[0].item() == 80.0 and s[-2].item() == 0.002
    t = cosine_t_from_sigma(s[:-1])
    assert torch.allclose(t.diff(), t.diff()[:1].expand(11), atol=1e-12)


def test_ddpm_timesteps_spacings():
    assert ddpm_timesteps(10, 1000, "leading").tolist() == list(range(900, -1, -100))
    assert ddpm_timesteps(10, 1000, "trailing").tolist() == list(range(999, 0, -100))
    assert ddpm_timesteps(4, 1000, "linspace").tolist() == [999, 666, 333, 0]
    assert ddpm_timesteps(1000, 1000).tolist() == list(range(999, -1, -1))
    for spacing in ("leading", "trailing", "linspace"):
        ts = ddpm_timesteps(7, 1000, spacing)
        assert ts.dtype == torch.int64 and len(ts) == 7 and (ts.diff() < 0).all()


def test_ddpm_sigmas_are_the_schedule_sigmas_at_the_timesteps():
    abar = alpha_bars_linear()
    s = sigmas_ddpm(50, abar, "trailing")
    assert s.shape == (51,) and s[-1].item() == 0.0 and (s.diff() < 0).all()
    ts = ddpm_timesteps(50, 1000, "trailing")
    assert torch.equal(s[:-1], sigma_from_alpha_bar(abar[ts]))
    assert s[0].item() == pytest.approx(math.sqrt((1 - abar[-1].item()) / abar[-1].item()))  # ~157


@pytest.mark.parametrize("call", [
    lambda: sigmas_karras(0), lambda: sigmas_karras(10, 1.0, 0.5), lambda: ddpm_timesteps(1001, 1000),
    lambda: ddpm_timesteps(10, 1000, "middle"), lambda: ddpm_betas(10, 0.5, 0.1),
    lambda: sigmas_for_budget("heun", 0), lambda: sigmas_for_budget("plms", 10),
    lambda: sigmas_for_budget("euler", 10, 1.0, 0.5), lambda: schedule_for_budget("euler", 2.5),
])
def test_bad_schedule_options_raise_config_error(call):
    with pytest.raises(ConfigError):
        call()

"""Objectives: EDM's Table 1, eps/v conversions, and oracle networks that make every denoiser exact."""

from __future__ import annotations

import math

import pytest
import torch

from minidiffusion.diffusion.objectives import (
    OBJECTIVES,
    CosineObjective,
    DDPMObjective,
    EDMObjective,
    Objective,
    edm_loss_weight,
    edm_sample_sigmas,
    edm_scalings,
    eps_from_v,
    get_objective,
    noisify_ddpm,
    v_from_x0_eps,
    x0_from_eps,
    x0_from_v,
)
from minidiffusion.diffusion.schedules import alpha_bar_cosine, alpha_bars_linear, t_to_sigma
from minidiffusion.errors import ConfigError

F64 = torch.float64


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def bc(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return v.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))


# --- EDM Table 1 --------------------------------------------------------------------------------

def test_edm_scalings_match_table_1_at_hand_computed_points():
    sigma = torch.tensor([0.002, 0.5, 1.0, 80.0], dtype=F64)
    c_skip, c_out, c_in, c_noise = edm_scalings(sigma, sigma_data=0.5)
    for i, s in enumerate(sigma.tolist()):
        assert c_skip[i].item() == pytest.approx(0.25 / (s * s + 0.25), rel=1e-14)
        assert c_out[i].item() == pytest.approx(s * 0.5 / math.sqrt(s * s + 0.25), rel=1e-14)
        assert c_in[i].item() == pytest.approx(1 / math.sqrt(s * s + 0.25), rel=1e-14)
        assert c_noise[i].item() == pytest.approx(math.log(s) / 4, rel=1e-14)
    # sigma = 1, sigma_data = 0.5 by hand: 0.2, 0.5/sqrt(1.25), 1/sqrt(1.25), 0
    assert [c[2].item() for c in (c_skip, c_out, c_in, c_noise)] == pytest.approx(
        [0.2, 0.4472135954999579, 0.8944271909999159, 0.0], abs=1e-15)
    # at sigma = sigma_data the skip and the network share the work equally
    assert c_skip[1].item() == pytest.approx(0.5) and c_out[1].item() == pytest.approx(0.5 / math.sqrt(2))


def test_edm_preconditioning_gives_unit_variance_input_and_target():
    """EDM Appendix B.6: with Var(x0) = sigma_data^2, Var(c_in x) = 1 and Var(F target) = 1 at every sigma."""
    g = gen(1)
    x0 = torch.randn(200_000, generator=g, dtype=F64) * 0.5
    n = torch.randn(200_000, generator=g, dtype=F64)
    for s in (0.01, 0.3, 2.0, 50.0):
        c_skip, c_out, c_in, _ = edm_scalings(torch.tensor(s, dtype=F64))
        x = x0 + s * n
        assert (c_in * x).std().item() == pytest.approx(1.0, abs=0.01)
        assert ((x0 - c_skip * x) / c_out).std().item() == pytest.approx(1.0, abs=0.01)


def test_edm_loss_weight_is_one_over_c_out_squared():
    sigma = torch.logspace(-3, 2, 20, dtype=F64)
    _, c_out, _, _ = edm_scalings(sigma)
    assert torch.allclose(edm_loss_weight(sigma) * c_out**2, torch.ones_like(sigma), rtol=1e-14)
    assert edm_loss_weight(torch.tensor(1.0, dtype=F64)).item() == pytest.approx(1.25 / 0.25)


def test_edm_training_sigmas_are_log_normal():
    log_sigma = edm_sample_sigmas(100_000, generator=gen(2)).log()
    assert log_sigma.mean().item() == pytest.approx(-1.2, abs=0.02)
    assert log_sigma.std().item() == pytest.approx(1.2, abs=0.02)


# --- eps / v conversions ------------------------------------------------------------------------

def test_v_eps_x0_conversions_round_trip():
    g = gen(3)
    x0, eps = torch.randn(6, 2, 3, 3, generator=g, dtype=F64), torch.randn(6, 2, 3, 3, generator=g, dtype=F64)
    abar = torch.tensor([1e-4, 0.1, 0.3, 0.5, 0.9, 0.9999], dtype=F64)
    x_t = bc(abar.sqrt(), x0) * x0 + bc((1 - abar).sqrt(), x0) * eps
    v = v_from_x0_eps(x0, eps, abar)
    assert torch.allclose(x0_from_v(x_t, v, abar), x0, atol=1e-12)
    assert torch.allclose(eps_from_v(x_t, v, abar), eps, atol=1e-12)
    assert torch.allclose(x0_from_eps(x_t, eps, abar), x0, atol=1e-10)
    # v has unit variance when x0 and eps do (why v-prediction is well scaled at every noise level)
    big = torch.randn(2, 100_000, generator=g, dtype=F64)
    for a in (0.01, 0.5, 0.99):
        v = v_from_x0_eps(big[0:1], big[1:2], torch.tensor([a], dtype=F64))
        assert v.std().item() == pytest.approx(1, abs=0.01)


def test_v_prediction_is_edm_preconditioning_with_sigma_data_one():
    g = gen(4)
    x, out = torch.randn(5, 3, generator=g, dtype=F64), torch.randn(5, 3, generator=g, dtype=F64)
    sigma = torch.tensor([0.01, 0.5, 1.0, 10.0, 300.0], dtype=F64)
    v_x0 = CosineObjective("v").to_x0(x, sigma, out)
    assert torch.allclose(v_x0, EDMObjective(sigma_data=1.0).to_x0(x, sigma, -out), atol=1e-13)
    # and it agrees with the VP formula x0 = sqrt(abar) x_t - sqrt(1 - abar) v, x_t = sqrt(abar) x
    abar = 1 / (1 + sigma**2)
    assert torch.allclose(v_x0, x0_from_v(x * bc(abar.sqrt(), x), out, abar), atol=1e-12)


# --- oracle networks: the exact target makes every denoiser exact and every loss zero -----------

def oracle(objective: Objective, x0: torch.Tensor):
    """A network that knows x0 and returns exactly what `objective` trains it to predict."""

    def net(x_in, level):
        if isinstance(objective, DDPMObjective):
            sigma = t_to_sigma(level.to(F64), objective.alpha_bars)  # fractional t allowed
            x = x_in * bc((1 + sigma**2).sqrt(), x_in)  # VP -> VE
            return (x - x0) / bc(sigma, x)  # eps
        if isinstance(objective, CosineObjective):
            abar = alpha_bar_cosine(level.to(F64) / objective.time_scale, objective.offset)
            eps = (x_in - bc(abar.sqrt(), x0) * x0) / bc((1 - abar).sqrt(), x0)
            return eps if objective.prediction == "eps" else v_from_x0_eps(x0, eps, abar)
        sigma = (4 * level.to(F64)).exp()  # EDM: c_noise = ln(sigma) / 4
        c_skip, c_out, c_in, _ = edm_scalings(sigma, objective.sigma_data)
        x = x_in / bc(c_in, x_in)
        return (x0 - bc(c_skip, x) * x) / bc(c_out, x)

    return net


OBJECTIVE_CASES = [
    DDPMObjective(), CosineObjective("eps"), CosineObjective("v"), CosineObjective("v", offset=0.008),
    CosineObjective("eps", time_scale=1000.0), EDMObjective(), EDMObjective(sigma_data=1.0),
]


@pytest.mark.parametrize("objective", OBJECTIVE_CASES, ids=repr)
def test_denoiser_with_oracle_network_recovers_x0(objective):
    g = gen(5)
    x0 = torch.randn(7, 1, 4, 4, generator=g, dtype=F64) * 0.5
    sigma = torch.tensor([0.01, 0.1, 0.5, 1.0, 3.3, 20.0, 80.0], dtype=F64)
    x = x0 + bc(sigma, x0) * torch.randn(x0.shape, generator=g, dtype=F64)
    x0_hat = objective.denoiser(oracle(objective, x0))(x, sigma)
    assert x0_hat.shape == x0.shape and x0_hat.dtype == F64
    assert torch.allclose(x0_hat, x0, atol=1e-9), (x0_hat - x0).abs().max()


@pytest.mark.parametrize("objective", OBJECTIVE_CASES, ids=repr)
def test_loss_is_zero_for_the_oracle_and_positive_otherwise(objective):
    x0 = torch.randn(64, 1, 4, 4, generator=gen(6), dtype=F64) * 0.5
    assert objective.loss(oracle(objective, x0), x0, generator=gen(7)).item() < 1e-16
    zero_net_loss = objective.loss(lambda x_in, level: torch.zeros_like(x_in), x0, generator=gen(7))
    assert zero_net_loss.ndim == 0 and 0.2 < zero_net_loss.item() < 5


def test_edm_loss_in_network_space_equals_weighted_denoiser_loss():
    """lambda(sigma) ||D - x0||^2 (EDM eq. 2 with Table 1 weight) == ||F - target||^2 (eq. 8)."""
    obj, x0 = EDMObjective(), torch.randn(32, 3, 2, 2, generator=gen(8), dtype=F64) * 0.5

    def net(x_in, level):
        return torch.tanh(x_in) * 0.7 + bc(level, x_in) * 0.1

    loss_f = obj.loss(net, x0, generator=gen(9))
    b = obj.training_batch(x0, gen(9))
    _, _, c_in, _ = edm_scalings(b.sigma)
    x = b.x_in / bc(c_in, b.x_in)
    per = (obj.denoiser(net)(x, b.sigma) - x0).pow(2).flatten(1).mean(1)
    assert loss_f.item() == pytest.approx((edm_loss_weight(b.sigma) * per).mean().item(), rel=1e-6)


def test_noisify_ddpm_closed_form_and_ranges():
    abar, x0 = alpha_bars_linear(), torch.randn(512, 2, generator=gen(10), dtype=F64)
    x_t, t, eps = noisify_ddpm(x0, abar, gen(11))
    assert t.dtype == torch.int64 and t.shape == (512,) and 0 <= t.min() and t.max() <= 999
    assert t.unique().numel() > 300  # uniform over 1000 timesteps
    assert torch.allclose(x_t, bc(abar[t].sqrt(), x0) * x0 + bc((1 - abar[t]).sqrt(), x0) * eps)
    again = noisify_ddpm(x0, abar, gen(11))
    assert all(torch.equal(a, b) for a, b in zip(again, (x_t, t, eps), strict=True))


def test_training_batches_carry_the_documented_noise_levels():
    x0 = torch.randn(256, 1, 2, 2, generator=gen(12))
    ddpm = DDPMObjective().training_batch(x0, gen(13))
    assert ddpm.x_in.dtype == torch.float32 and ddpm.noise_level.dtype == torch.float32
    assert torch.equal(ddpm.noise_level, ddpm.noise_level.round()) and ddpm.noise_level.max() <= 999
    cos = CosineObjective("v").training_batch(x0, gen(13))
    assert 0 <= cos.noise_level.min() and cos.noise_level.max() < 1
    edm = EDMObjective().training_batch(x0, gen(13))
    assert torch.allclose(edm.noise_level.double(), edm.sigma.log() / 4, atol=1e-6)
    assert torch.allclose(edm.weight, torch.ones(256), atol=1e-6)
    for b in (ddpm, cos, edm):
        assert b.target.shape == x0.shape and b.weight.shape == (256,) and b.sigma.shape == (256,)


def test_registry_and_bad_options():
    assert set(OBJECTIVES) == {"ddpm", "cosine", "edm"}
    assert isinstance(get_objective("cosine", prediction="v"), CosineObjective)
    with pytest.raises(ConfigError, match="ddpm, cosine, edm"):
        get_objective("flow")
    with pytest.raises(ConfigError):
        CosineObjective("x0")
    with pytest.raises(ConfigError):
        EDMObjective(sigma_data=0.0)


def test_denoiser_passes_conditioning_through_and_keeps_dtype():
    seen = {}

    def net(x_in, level, label=None):
        seen["label"], seen["level_dtype"] = label, level.dtype
        return torch.zeros_like(x_in)

    x = torch.randn(3, 1, 2, 2)
    out = EDMObjective().denoiser(net)(x, torch.full((3,), 2.0, dtype=F64), label=torch.tensor([1, 2, 3]))
    assert out.dtype == torch.float32 and seen["level_dtype"] == torch.float32
    assert seen["label"].tolist() == [1, 2, 3]

"""The few-step solvers: DPM-Solver++(2M) SDE, (3M) SDE and (2S) ancestral, UniPC and iPNDM.

On data whose exact denoiser is known (tests/test_samplers.py's Gaussian and two-component mixture):
the law of the samples, the convergence orders of the deterministic forms, exactness where the
interpolation is exact, seeds, identities with the other samplers, and diffusers as an independent
implementation wherever it has the same method.
"""

from __future__ import annotations

import math

import pytest
import torch

from minidiffusion.diffusion.objectives import DDPMObjective
from minidiffusion.diffusion.samplers import (
    SAMPLERS,
    ancestral_split,
    nfe,
    sample_ddpm,
    sample_dpmpp_2m,
    sample_dpmpp_2m_sde,
    sample_dpmpp_2s_ancestral,
    sample_dpmpp_3m_sde,
    sample_euler,
    sample_heun,
    sample_ipndm,
    sample_lms,
    sample_unipc,
    steps_for_budget,
)
from minidiffusion.diffusion.schedules import sigmas_exponential, sigmas_karras, t_to_sigma
from minidiffusion.errors import ConfigError
from test_samplers import (
    F64,
    eps_net,
    exact_ode,
    gaussian_denoiser,
    gen,
    mixture_denoiser,
)

NEW = ("dpmpp_2m_sde", "dpmpp_3m_sde", "dpmpp_2s_ancestral", "unipc", "ipndm")
STOCHASTIC = ("dpmpp_2m_sde", "dpmpp_3m_sde", "dpmpp_2s_ancestral")  # with eta > 0 (their default 1)


# --- the distribution comes out right: their cases are in test_samplers.py's DISTRIBUTION_CASES ----

# --- convergence orders of the deterministic forms ----------------------------------------------
# Karras sigmas 80 -> 0.002 without the final 0 (the exact solution is the reference), as in
# test_samplers.py. Observed log2(err(N) / err(2N)) at N = 32 -> 64 -> 128 on the Gaussian:
# 2m_sde eta 0: midpoint 2.11, 2.05, heun 2.17, 2.07; 3m_sde eta 0: 3.11, 3.06; 2s eta 0: 1.95, 1.98;
# unipc bh2 3.04, 3.02, bh1 3.19, 3.09, order 3: 4.00, 4.01 (UniC-p is order p + 1); ipndm 2.13, 2.04:
# its constant-step weights are only second order on a non-uniform grid (fourth on a uniform one,
# where it is LMS: see the identities below).
ORDERS = {  # id: (sampler, options, expected order, slack)
    "2m_sde-midpoint": ("dpmpp_2m_sde", {"eta": 0.0}, 2.0, 0.25),
    "2m_sde-heun": ("dpmpp_2m_sde", {"eta": 0.0, "solver_type": "heun"}, 2.0, 0.25),
    "3m_sde": ("dpmpp_3m_sde", {"eta": 0.0}, 3.0, 0.3),
    "2s_ancestral": ("dpmpp_2s_ancestral", {"eta": 0.0}, 2.0, 0.25),
    "unipc-bh2": ("unipc", {}, 3.0, 0.3),
    "unipc-bh1": ("unipc", {"solver_type": "bh1"}, 3.0, 0.3),
    "unipc-order3": ("unipc", {"order": 3}, 4.0, 0.4),
    "ipndm": ("ipndm", {}, 2.0, 0.25),
}
X_START = torch.linspace(-2.5, 2.5, 33, dtype=F64).unsqueeze(1) * 80.0


def _ode_error(name: str, options: dict, steps: int, denoiser=gaussian_denoiser, reference=None) -> float:
    out = SAMPLERS[name](denoiser, X_START, sigmas_karras(steps + 1, 0.002, 80.0)[:-1], **options)
    ref = exact_ode(X_START, 80.0, 0.002) if reference is None else reference
    return (out - ref).abs().max().item()


@pytest.mark.parametrize("case", list(ORDERS))
def test_deterministic_solvers_converge_at_their_order_to_the_exact_gaussian_solution(case):
    name, options, order, slack = ORDERS[case]
    errors = [_ode_error(name, options, n) for n in (32, 64, 128)]
    observed = [math.log2(a / b) for a, b in zip(errors, errors[1:], strict=False)]
    assert all(order - slack <= o <= order + 0.5 for o in observed), (errors, observed)


@pytest.fixture(scope="module")
def mixture_reference():
    """No closed form for the mixture: the reference is Heun with 1024 steps (error ~1e-6)."""
    return sample_heun(mixture_denoiser, X_START, sigmas_karras(1025, 0.002, 80.0)[:-1])


@pytest.mark.parametrize("case", list(ORDERS))
def test_deterministic_solvers_converge_on_the_gaussian_mixture(case, mixture_reference):
    name, options, order, _ = ORDERS[case]
    e32, e64 = (_ode_error(name, options, n, mixture_denoiser, mixture_reference) for n in (32, 64))
    assert e64 < e32 * 2 ** -(order - 0.35), (e32, e64)


def polynomial_denoiser(coeffs: list[float]):
    """x0_hat = P(lambda) = sum_k coeffs[k] lambda^k, lambda = -log sigma, whatever x; and the exact
    solution of the ODE dx/dlambda = P - x: x = sum_j (-1)^j P^(j) plus e^{-(lambda - lambda_0)} times
    whatever matches the start."""
    def denoiser(x, sigma):
        lam = -torch.log(sigma).to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        return sum(c * lam**k for k, c in enumerate(coeffs)) + 0 * x

    def particular(lam: float) -> float:
        return sum((-1) ** j * c * math.factorial(k) / math.factorial(k - j) * lam ** (k - j)
                   for k, c in enumerate(coeffs) for j in range(k + 1))

    def exact(x_start, sigma_start, sigma_end):
        l0, l1 = -math.log(sigma_start), -math.log(sigma_end)
        return particular(l1) + (x_start - particular(l0)) * math.exp(-(l1 - l0))

    return denoiser, exact


@pytest.mark.parametrize(("name", "options", "degree"), [
    ("dpmpp_3m_sde", {"eta": 0.0}, 2),
    ("dpmpp_2m_sde", {"eta": 0.0, "solver_type": "heun"}, 1),
])
def test_multistep_solvers_are_exact_when_x0_is_a_polynomial_of_their_degree_in_lambda(name, options, degree):
    """The exponential integrator with the exact Taylor weights integrates an x0 polynomial in lambda
    exactly once it has enough estimates (k-diffusion's and diffusers' 3M, whose second difference
    carries half the weight, do not). D does not depend on x here, so a step maps an error e to
    e sigma_next / sigma: after the `degree` warm-up steps, the error must only shrink that way.
    One degree more breaks it."""
    sigmas = torch.tensor([20.0, 12.0, 8.0, 3.0, 1.0, 0.4, 0.1], dtype=F64)
    x = torch.linspace(-30, 30, 7, dtype=F64).unsqueeze(1)
    coeffs, warm = [0.3, -0.2, 0.05, 0.01], sigmas[: degree + 1]
    for extra, ok in ((0, True), (1, False)):
        denoiser, exact = polynomial_denoiser(coeffs[: degree + 1 + extra])
        warm_error = SAMPLERS[name](denoiser, x, warm, **options) - exact(x, 20.0, warm[-1].item())
        error = SAMPLERS[name](denoiser, x, sigmas, **options) - exact(x, 20.0, 0.1)
        assert warm_error.abs().max() > 1e-3  # the warm-up is not exact: the test can see errors
        assert ((error - warm_error * (0.1 / warm[-1].item())).abs().max() < 1e-12) == ok


# --- eta, seeds and the generator ---------------------------------------------------------------

def _start(n=64, seed=5):
    return torch.randn(n, 3, generator=gen(seed), dtype=F64) * 80.0


@pytest.mark.parametrize("name", STOCHASTIC)
def test_same_seed_same_samples_another_seed_other_samples(name):
    sigmas, x = sigmas_karras(10), _start(8)
    for eta in (1.0, 0.3):
        a = SAMPLERS[name](mixture_denoiser, x, sigmas, generator=gen(3), eta=eta)
        assert torch.equal(a, SAMPLERS[name](mixture_denoiser, x, sigmas, generator=gen(3), eta=eta))
        assert not torch.equal(a, SAMPLERS[name](mixture_denoiser, x, sigmas, generator=gen(4), eta=eta))


@pytest.mark.parametrize("name", NEW)
def test_deterministic_forms_never_draw_from_the_generator(name):
    options = {"eta": 0.0} if name in STOCHASTIC else {}
    g, sigmas, x = gen(7), sigmas_karras(10), _start(8)
    a = SAMPLERS[name](mixture_denoiser, x, sigmas, generator=g, **options)
    assert torch.equal(g.get_state(), gen(7).get_state())
    assert torch.equal(a, SAMPLERS[name](mixture_denoiser, x, sigmas, generator=gen(8), **options))
    assert torch.equal(a, SAMPLERS[name](mixture_denoiser, x, sigmas, **options))


def test_eta_zero_is_the_deterministic_solver():
    sigmas, x = sigmas_karras(12), _start()
    assert torch.equal(sample_dpmpp_2m_sde(mixture_denoiser, x, sigmas, eta=0.0, generator=gen(1)),
                       sample_dpmpp_2m(mixture_denoiser, x, sigmas))
    # UniP-3 (the order conditions solved numerically) agrees with 3M's closed-form weights from the
    # third step on; they differ only in the second-order warm-up step (midpoint-like vs exact weight)
    a = sample_dpmpp_3m_sde(mixture_denoiser, x, sigmas, eta=0.0)
    b = sample_unipc(mixture_denoiser, x, sigmas, order=3, corrector=False)
    assert 0 < (a - b).abs().max() < 0.05 * (a - sample_dpmpp_2m(mixture_denoiser, x, sigmas)).abs().max()
    # 2S with eta = 0: no noise, and a small eta moves the samples only a little
    det = sample_dpmpp_2s_ancestral(mixture_denoiser, x, sigmas, eta=0.0)
    near = sample_dpmpp_2s_ancestral(mixture_denoiser, x, sigmas, eta=1e-4, generator=gen(1))
    assert 0 < (det - near).abs().max() < 1e-3


@pytest.mark.parametrize("name", ["dpmpp_2m_sde", "dpmpp_3m_sde"])
def test_one_sde_step_at_eta_one_is_the_ddpm_posterior_step(name):
    """The first-order SDE step: mean e^{-2h} x + (1 - e^{-2h}) D, std sigma_next sqrt(1 - e^{-2h}),
    with e^{-h} = sigma_next / sigma: the DDPM posterior, drawn from the same generator."""
    x, sigmas = _start(), torch.tensor([3.0, 1.1], dtype=F64)
    ours = SAMPLERS[name](mixture_denoiser, x, sigmas, generator=gen(2))
    assert torch.allclose(ours, sample_ddpm(mixture_denoiser, x, sigmas, generator=gen(2)), atol=1e-12, rtol=0)


# --- identities with the other samplers ---------------------------------------------------------

def test_unip_without_corrector_is_dpmpp_2m_and_order_one_is_euler():
    sigmas, x = sigmas_karras(15), _start()
    assert torch.allclose(sample_unipc(mixture_denoiser, x, sigmas, corrector=False),
                          sample_dpmpp_2m(mixture_denoiser, x, sigmas), atol=1e-10, rtol=0)
    assert torch.allclose(sample_unipc(mixture_denoiser, x, sigmas, order=1, corrector=False),
                          sample_euler(mixture_denoiser, x, sigmas), atol=1e-10, rtol=0)
    # the corrector is what the method adds: it changes the result, at no extra call (test_samplers' nfe test)
    assert not torch.allclose(sample_unipc(mixture_denoiser, x, sigmas), sample_dpmpp_2m(mixture_denoiser, x, sigmas))


def test_ipndm_is_lms_on_a_uniform_grid_and_euler_at_order_one():
    """On equal steps the variable-step LMS weights are the constant Adams-Bashforth ones."""
    x = _start()
    uniform = torch.linspace(80.0, 0.5, 30, dtype=F64)
    ipndm, lms = (f(mixture_denoiser, x, uniform) for f in (sample_ipndm, sample_lms))
    assert torch.allclose(ipndm, lms, atol=1e-9, rtol=0)
    karras = sigmas_karras(12)
    assert torch.allclose(sample_ipndm(mixture_denoiser, x, karras, order=1), sample_euler(mixture_denoiser, x, karras),
                          atol=1e-12, rtol=0)
    assert not torch.allclose(sample_ipndm(mixture_denoiser, x, karras), sample_lms(mixture_denoiser, x, karras))


def test_2s_ancestral_evaluates_at_the_lambda_midpoint_twice_per_step_once_on_the_last():
    sigmas, seen = sigmas_karras(5), []
    sample_dpmpp_2s_ancestral(lambda x, s: seen.append(s[0].item()) or gaussian_denoiser(x, s), _start(4), sigmas,
                              generator=gen())
    assert len(seen) == nfe("dpmpp_2s_ancestral", 5) == 9
    down, _ = ancestral_split(80.0, sigmas[1].item(), 1.0)
    assert seen[:3] == pytest.approx([80.0, math.sqrt(80.0 * down), sigmas[1].item()])
    assert seen[-1] == pytest.approx(0.002)  # the last step to 0: one call, an Euler step


def test_steps_for_budget_inverts_nfe():
    for name in SAMPLERS:
        for budget in (1, 2, 5, 10, 25):
            steps = steps_for_budget(name, budget)
            assert steps >= 1 and (nfe(name, steps) <= budget or steps == 1)
            assert nfe(name, steps + 1) > budget
    assert steps_for_budget("heun", 10) == 5 and steps_for_budget("dpmpp_2s_ancestral", 9) == 5
    assert steps_for_budget("unipc", 10) == 10 and steps_for_budget("heun", 1) == 1


@pytest.mark.parametrize("call", [
    lambda x, s: sample_dpmpp_2m_sde(gaussian_denoiser, x, s, eta=-0.1),
    lambda x, s: sample_dpmpp_2m_sde(gaussian_denoiser, x, s, solver_type="bh2"),
    lambda x, s: sample_dpmpp_3m_sde(gaussian_denoiser, x, s, eta=-1.0),
    lambda x, s: sample_dpmpp_2s_ancestral(gaussian_denoiser, x, s, eta=-0.5),
    lambda x, s: sample_unipc(gaussian_denoiser, x, s, solver_type="midpoint"),
    lambda x, s: sample_unipc(gaussian_denoiser, x, s, order=4),
    lambda x, s: sample_ipndm(gaussian_denoiser, x, s, order=5),
    lambda x, s: sample_ipndm(gaussian_denoiser, x, s, order=0),
    lambda x, s: steps_for_budget("unipc", 0),
    lambda x, s: steps_for_budget("plms", 10),
])
def test_bad_options_raise_config_error(call):
    with pytest.raises(ConfigError):
        call(torch.zeros(2, 1), sigmas_karras(4))


# --- diffusers as an independent implementation (test-only dependency) --------------------------
# The same stand-in network as test_samplers.py (exact eps of the Gaussian plus a perturbation).
# Where diffusers builds the sigmas itself it keeps them, and for DPM-Solver its sample, in float32:
# 1e-5 tolerances (observed 5e-8 .. 4e-7); where we hand it our float64 sigmas and it stays in
# float64 (UniPC on our grid, iPNDM, DPM-Solver singlestep), 1e-10 (observed <= 2e-14).
# Not compared: dpmpp_3m_sde (diffusers' third-order multistep weights the second difference by half
# the Taylor coefficient, like k-diffusion, and its SDE branch adds 1/2 where the ODE one subtracts
# it, so neither is exact for quadratic x0; see the exactness test above), eta other than 0 and 1
# (diffusers has no eta), and dpmpp_2s_ancestral with eta > 0 (diffusers has no DPM-Solver++(2S)
# ancestral sampler; its KDPM2Ancestral is DPM-Solver-2, another method).

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning:diffusers")


@pytest.fixture(scope="module")
def oracle():
    try:
        import diffusers
    except Exception as err:  # any import failure means the oracle is missing
        pytest.fail(f"diffusers is needed for these tests ({err!r}); install the test extras: pip install -e .[dev]")
    abar = diffusers.DDPMScheduler(num_train_timesteps=1000).alphas_cumprod.double()
    denoiser = DDPMObjective(abar).denoiser(lambda x_in, t: eps_net(x_in, t_to_sigma(t, abar)))
    return diffusers, denoiser


def _vp_chain(sched, sigmas: list[float], x: torch.Tensor, noises=None) -> torch.Tensor:
    """Run a diffusers scheduler that works on the VP sample x / sqrt(1 + sigma^2), with eps_net,
    model call i at sigmas[i]; return its result in our (VE) scaling at sigmas[-1]."""
    sample = x / math.sqrt(1 + sigmas[0] ** 2)
    for i, t in enumerate(sched.timesteps):
        out = eps_net(sample, torch.tensor(sigmas[i], dtype=F64))
        extra = {} if noises is None else {"variance_noise": noises[i]}
        sample = sched.step(out, t, sample, **extra).prev_sample
    return sample.double() * math.sqrt(1 + sigmas[len(sched.timesteps)] ** 2)


def _on_our_sigmas(sched, sigmas: torch.Tensor):
    """Put a diffusers multistep scheduler on our float64 sigmas (its timesteps are only labels)."""
    sched.set_timesteps(len(sigmas) - 1)
    sched.sigmas = sigmas.clone()
    sched.timesteps = torch.arange(len(sigmas) - 1, 0, -1)
    return sched


OUR_GRID = sigmas_karras(21, 0.03, 14.6)[:-1]  # 20 steps inside the DDPM range, no final 0


@pytest.mark.parametrize("solver_type", ["midpoint", "heun"])
def test_dpmpp_2m_sde_matches_diffusers_with_the_same_noise(oracle, solver_type):
    """eta = 1 (diffusers' only SDE); its noise is passed explicitly, the draws our sampler makes
    from the same seed: one normal tensor per step, none on the step to sigma 0."""
    d, denoiser = oracle
    sched = d.DPMSolverMultistepScheduler(use_karras_sigmas=True, algorithm_type="sde-dpmsolver++",
                                          solver_order=2, solver_type=solver_type)
    sched.set_timesteps(20)
    sigmas = sched.sigmas.double()
    x = torch.randn(2, 1, 4, 4, generator=gen(5), dtype=F64) * sigmas[0].item()
    g = gen(6)
    noises = [torch.randn(x.shape, generator=g, dtype=F64) for _ in range(19)] + [torch.zeros(x.shape, dtype=F64)]
    theirs = _vp_chain(sched, sigmas.tolist(), x, noises)
    ours = sample_dpmpp_2m_sde(denoiser, x, sigmas, generator=gen(6), solver_type=solver_type)
    assert ours.abs().max() < 5
    assert torch.allclose(ours, theirs, atol=1e-5, rtol=1e-5), (ours - theirs).abs().max()


def test_unipc_matches_diffusers_down_to_sigma_zero(oracle):
    """bh2, order 2, diffusers' own Karras sigmas ending in 0 (its lower_order_final is then only
    our first-order last step). bh1 cannot be run to 0 there: B1(h) = h is infinite on that step and
    diffusers multiplies it by the empty correction (NaN); the grid test below covers bh1."""
    d, denoiser = oracle
    sched = d.UniPCMultistepScheduler(use_karras_sigmas=True, solver_type="bh2", solver_order=2)
    sched.set_timesteps(20)
    sigmas = sched.sigmas.double()
    x = torch.randn(2, 1, 4, 4, generator=gen(5), dtype=F64) * sigmas[0].item()
    theirs = _vp_chain(sched, sigmas.tolist(), x)
    ours = sample_unipc(denoiser, x, sigmas)
    assert ours.abs().max() < 5
    assert torch.allclose(ours, theirs, atol=1e-5, rtol=1e-5), (ours - theirs).abs().max()


@pytest.mark.parametrize("corrector", [True, False])
@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("solver_type", ["bh1", "bh2"])
def test_unipc_matches_diffusers_on_our_sigmas(oracle, solver_type, order, corrector):
    d, denoiser = oracle
    sched = _on_our_sigmas(d.UniPCMultistepScheduler(solver_type=solver_type, solver_order=order,
                                                     lower_order_final=False,
                                                     disable_corrector=[] if corrector else list(range(20))),
                           OUR_GRID)
    x = torch.randn(2, 1, 4, 4, generator=gen(5), dtype=F64) * OUR_GRID[0].item()
    theirs = _vp_chain(sched, OUR_GRID.tolist(), x)
    ours = sample_unipc(denoiser, x, OUR_GRID, order=order, solver_type=solver_type, corrector=corrector)
    assert torch.allclose(ours, theirs, atol=1e-10, rtol=0), (ours - theirs).abs().max()


def test_ipndm_matches_diffusers_on_our_sigmas(oracle):
    """diffusers' IPNDM runs on (alpha, sigma) = (cos, sin) pairs of its own and combines v-style
    outputs; we give it ours, alpha = 1/sqrt(1 + sigma^2), and the output whose combination is eps."""
    d, denoiser = oracle
    sigmas = sigmas_karras(20, 0.03, 14.6)  # ending in 0
    sched = d.IPNDMScheduler()
    sched.set_timesteps(20)
    sched.betas, sched.alphas = sigmas / (1 + sigmas**2).sqrt(), 1 / (1 + sigmas**2).sqrt()
    x = torch.randn(2, 1, 4, 4, generator=gen(5), dtype=F64) * sigmas[0].item()
    sample = x * sched.alphas[0]
    for i, t in enumerate(sched.timesteps):
        eps = eps_net(sample, sigmas[i])
        sample = sched.step((eps - sched.betas[i] * sample) / sched.alphas[i], t, sample).prev_sample
    ours = sample_ipndm(denoiser, x, sigmas)
    assert ours.abs().max() < 5
    assert torch.allclose(ours, sample, atol=1e-10, rtol=0), (ours - sample).abs().max()


def test_dpmpp_2s_with_eta_zero_matches_diffusers_singlestep(oracle):
    """diffusers' singlestep DPM-Solver++ of order 2 takes each 2S step over two of its grid
    intervals; with the lambda-midpoints interleaved into our sigmas it is our eta = 0 sampler."""
    d, denoiser = oracle
    sigmas = sigmas_karras(10, 0.03, 14.6)
    mids = (sigmas[:-2] * sigmas[1:-1]).sqrt()
    grid = torch.cat([torch.stack([sigmas[:-2], mids], 1).flatten(), sigmas[-2:]])  # ..., s_8, mid, s_9, 0
    sched = _on_our_sigmas(d.DPMSolverSinglestepScheduler(solver_order=2, algorithm_type="dpmsolver++",
                                                          solver_type="midpoint"), grid)
    assert sched.order_list == [1, 2] * 9 + [1]
    x = torch.randn(2, 1, 4, 4, generator=gen(5), dtype=F64) * sigmas[0].item()
    theirs = _vp_chain(sched, grid.tolist(), x)
    ours = sample_dpmpp_2s_ancestral(denoiser, x, sigmas, eta=0.0)
    assert ours.abs().max() < 5
    assert torch.allclose(ours, theirs, atol=1e-10, rtol=0), (ours - theirs).abs().max()


def test_exponential_sigmas_are_diffusers_lambda_uniform_sigmas(oracle):
    d, _ = oracle
    sched = d.DPMSolverMultistepScheduler(use_lu_lambdas=True)
    sched.set_timesteps(12)
    s = sched.sigmas.double()
    assert torch.allclose(sigmas_exponential(12, s[-2].item(), s[0].item()), s, rtol=1e-6)

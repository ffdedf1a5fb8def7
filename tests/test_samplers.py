"""Samplers on data whose exact denoiser is known (a Gaussian, a 2-component Gaussian mixture),
convergence orders of the ODE solvers, the shared interface, and diffusers as an independent oracle.

Gaussian data x0 ~ N(mu, s^2) per dimension: x = x0 + sigma eps has
    E[x0 | x] = (s^2 x + sigma^2 mu) / (s^2 + sigma^2),
and the probability-flow ODE has the closed-form solution
    x(sigma) = (x(sigma_max) - mu) sqrt(s^2 + sigma^2) / sqrt(s^2 + sigma_max^2) + mu.
"""

from __future__ import annotations

import math

import pytest
import torch

from minidiffusion.diffusion.objectives import DDPMObjective
from minidiffusion.diffusion.samplers import (
    SAMPLERS,
    ancestral_split,
    churn,
    get_sampler,
    nfe,
    sample_ddim,
    sample_ddpm,
    sample_euler,
    sample_euler_ancestral,
    sample_heun,
    sample_lms,
)
from minidiffusion.diffusion.schedules import (
    alpha_bars_linear,
    ddpm_timesteps,
    sigma_from_alpha_bar,
    sigmas_ddpm,
    sigmas_karras,
    t_to_sigma,
)
from minidiffusion.errors import ConfigError

F64 = torch.float64
MU, S = 0.3, 0.5
# the mixture's weights, means and stds
MW, MM, MS = (torch.tensor(v, dtype=F64) for v in ([0.3, 0.7], [-0.5, 0.4], [0.15, 0.25]))
MIX_MEAN = (MW * MM).sum().item()
MIX_STD = math.sqrt((MW * (MS**2 + MM**2)).sum().item() - MIX_MEAN**2)
MIX_P_NEG = (MW * 0.5 * (1 + torch.erf(-MM / (MS * math.sqrt(2))))).sum().item()  # P(x0 < 0)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def gaussian_denoiser(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    sg = sigma.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
    return (S**2 * x + sg**2 * MU) / (S**2 + sg**2)


def mixture_denoiser(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Posterior-weighted mix of the two per-component Gaussian denoisers."""
    sg2 = sigma.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1))) ** 2
    (w0, w1), (m0, m1), (s0, s1) = MW.tolist(), MM.tolist(), MS.tolist()
    v0, v1 = s0**2 + sg2, s1**2 + sg2  # each component's variance at this noise level
    # posterior weight of component 1: sigmoid of the log-likelihood ratio
    r1 = torch.sigmoid(math.log(w1 / w0) - 0.5 * torch.log(v1 / v0) - 0.5 * (x - m1) ** 2 / v1
                       + 0.5 * (x - m0) ** 2 / v0)
    d0, d1 = (s0**2 * x + sg2 * m0) / v0, (s1**2 * x + sg2 * m1) / v1
    return d0 + r1 * (d1 - d0)


def exact_ode(x_start: torch.Tensor, sigma_start: float, sigma_end: float) -> torch.Tensor:
    return (x_start - MU) * math.sqrt(S**2 + sigma_end**2) / math.sqrt(S**2 + sigma_start**2) + MU


# --- the distribution comes out right -----------------------------------------------------------
# (sampler, options, sigmas): step counts chosen so that discretisation error is well inside the
# tolerances (observed |mean error| <= 0.011, |std error| <= 0.016 on these seeds).
DISTRIBUTION_CASES = [
    ("ddpm", {}, sigmas_ddpm(1000)),                         # the original: all 1000 steps
    ("ddpm", {"variance": "large"}, sigmas_ddpm(250)),
    ("ddim", {"eta": 0.0}, sigmas_ddpm(100)),
    ("euler", {}, sigmas_karras(100)),
    ("euler_ancestral", {}, sigmas_karras(400)),              # first order in law: needs many steps
    ("euler_ancestral", {"eta": 0.5}, sigmas_karras(200)),
    ("heun", {}, sigmas_karras(40)),
    ("heun", {"s_churn": 40.0}, sigmas_karras(64)),
    ("lms", {}, sigmas_karras(40)),
    ("dpmpp_2m", {}, sigmas_karras(40)),
    # the solvers of tests/test_solvers.py; |std error| <= 0.016 on these seeds
    ("dpmpp_2m_sde", {}, sigmas_karras(50)),
    ("dpmpp_2m_sde", {"eta": 0.5, "solver_type": "heun"}, sigmas_karras(50)),
    ("dpmpp_3m_sde", {}, sigmas_karras(40)),
    ("dpmpp_2s_ancestral", {}, sigmas_karras(40)),
    ("unipc", {}, sigmas_karras(20)),
    ("unipc", {"solver_type": "bh1", "order": 3}, sigmas_karras(20)),
    ("ipndm", {}, sigmas_karras(20)),
]
MEAN_TOL, STD_TOL = 0.02, 0.025


def _ids(case):
    return f"{case[0]}-{case[1]}-{len(case[2]) - 1}"


@pytest.mark.parametrize("case", DISTRIBUTION_CASES, ids=_ids)
def test_samples_of_gaussian_data_have_the_right_mean_and_std(case):
    name, options, sigmas = case
    x = torch.randn(20_000, 1, generator=gen(1), dtype=F64) * sigmas[0]
    out = SAMPLERS[name](gaussian_denoiser, x, sigmas, generator=gen(2), **options)
    assert abs(out.mean().item() - MU) < MEAN_TOL
    assert abs(out.std().item() - S) < STD_TOL


@pytest.mark.parametrize("case", DISTRIBUTION_CASES, ids=_ids)
def test_samples_of_a_gaussian_mixture_have_the_right_mean_std_and_mode_weights(case):
    name, options, sigmas = case
    x = torch.randn(10_000, 1, generator=gen(3), dtype=F64) * sigmas[0]
    out = SAMPLERS[name](mixture_denoiser, x, sigmas, generator=gen(4), **options)
    assert abs(out.mean().item() - MIX_MEAN) < MEAN_TOL
    assert abs(out.std().item() - MIX_STD) < STD_TOL
    assert abs((out < 0).double().mean().item() - MIX_P_NEG) < 0.02


# --- convergence orders of the deterministic solvers --------------------------------------------
# Karras sigmas from 80 down to 0.002 (without the final 0, so the exact solution is the reference).
# Observed log2(err(N) / err(2N)) at N = 32 -> 64 -> 128: euler/ddim 0.99, 1.00; heun 2.10, 2.05;
# dpmpp_2m 2.16, 2.08; lms (order 4, started with lower orders) 3.48, 3.75.
ORDERS = {"euler": (1.0, 0.2), "ddim": (1.0, 0.2), "heun": (2.0, 0.25), "dpmpp_2m": (2.0, 0.25),
          "lms": (3.4, 0.3)}


def _ode_error(name: str, steps: int, denoiser=gaussian_denoiser, reference=None) -> float:
    sigmas = sigmas_karras(steps + 1, 0.002, 80.0)[:-1]  # `steps` steps, 80 -> 0.002
    x_start = torch.linspace(-2.5, 2.5, 33, dtype=F64).unsqueeze(1) * 80.0
    out = SAMPLERS[name](denoiser, x_start, sigmas)
    ref = exact_ode(x_start, 80.0, 0.002) if reference is None else reference
    return (out - ref).abs().max().item()


@pytest.mark.parametrize("name", list(ORDERS))
def test_ode_solvers_converge_at_their_order_to_the_exact_gaussian_solution(name):
    order, slack = ORDERS[name]
    errors = [_ode_error(name, n) for n in (32, 64, 128)]
    observed = [math.log2(a / b) for a, b in zip(errors, errors[1:], strict=False)]
    assert all(order - slack <= o for o in observed), (errors, observed)
    if name != "lms":
        assert all(o <= order + 0.5 for o in observed), (errors, observed)


@pytest.fixture(scope="module")
def mixture_reference():
    """No closed form for the mixture: the reference is Heun with 1024 steps (error ~1e-6)."""
    x_start = torch.linspace(-2.5, 2.5, 33, dtype=F64).unsqueeze(1) * 80.0
    return sample_heun(mixture_denoiser, x_start, sigmas_karras(1025, 0.002, 80.0)[:-1])


@pytest.mark.parametrize("name", list(ORDERS))
def test_ode_solvers_converge_on_the_gaussian_mixture(name, mixture_reference):
    e32, e64 = (_ode_error(name, n, mixture_denoiser, mixture_reference) for n in (32, 64))
    assert e64 < e32 * 2 ** -(ORDERS[name][0] - 0.35), (e32, e64)


def test_heun_is_far_more_accurate_than_euler_at_equal_cost():
    # heun with 32 steps = 63 evaluations vs euler with 64 (observed: 3.0x smaller error)
    assert _ode_error("heun", 32) < _ode_error("euler", 64) / 2.5


# --- identities between samplers ----------------------------------------------------------------

def _start(n=64, seed=5):
    return torch.randn(n, 3, generator=gen(seed), dtype=F64) * 80.0


def test_ddim_with_eta_zero_is_euler_and_with_eta_is_euler_ancestral():
    sigmas, x = sigmas_karras(15), _start()
    euler = sample_euler(gaussian_denoiser, x, sigmas)
    assert torch.allclose(sample_ddim(gaussian_denoiser, x, sigmas), euler, atol=1e-12)
    a = sample_ddim(mixture_denoiser, x, sigmas, eta=0.7, generator=gen(1))
    b = sample_euler_ancestral(mixture_denoiser, x, sigmas, eta=0.7, generator=gen(1))
    assert torch.equal(a, b)


def test_ddpm_small_variance_is_ddim_with_eta_one_and_large_adds_more_noise():
    sigmas, x = sigmas_ddpm(20), _start(2000)
    small = sample_ddpm(gaussian_denoiser, x, sigmas, generator=gen(1))
    assert torch.equal(small, sample_ddim(gaussian_denoiser, x, sigmas, generator=gen(1), eta=1.0))
    large = sample_ddpm(gaussian_denoiser, x, sigmas, generator=gen(1), variance="large")
    assert large.std() > small.std()


def test_lms_of_order_one_is_euler():
    sigmas, x = sigmas_karras(12), _start()
    euler = sample_euler(mixture_denoiser, x, sigmas)
    assert torch.allclose(sample_lms(mixture_denoiser, x, sigmas, order=1), euler, atol=1e-12)


def test_ancestral_split_is_the_ddpm_posterior_at_eta_one():
    s, s_next = 2.0, 0.5
    down, up = ancestral_split(s, s_next, 1.0)
    assert down**2 + up**2 == pytest.approx(s_next**2)
    assert up**2 == pytest.approx(s_next**2 * (s**2 - s_next**2) / s**2)  # posterior variance, VE
    assert down == pytest.approx(s_next**2 / s)                            # posterior mean weight
    assert ancestral_split(s, s_next, 0.0) == (s_next, 0.0)
    assert ancestral_split(s, 0.0, 1.0) == (0.0, 0.0)
    assert ancestral_split(s, s_next, 50.0)[1] == s_next                     # capped


def test_churn_follows_edm_algorithm_2():
    x = torch.zeros(1000, dtype=F64)
    x_hat, s_hat = churn(x, 1.0, 10, 2.0, 0.0, math.inf, 1.0, gen(1))  # gamma = S_churn / N = 0.2
    assert s_hat == pytest.approx(1.2)
    assert torch.allclose(x_hat, torch.randn(1000, generator=gen(1), dtype=F64) * math.sqrt(1.2**2 - 1))
    assert churn(x, 1.0, 10, 100.0, 0.0, math.inf, 1.0, gen(1))[1] == pytest.approx(math.sqrt(2))  # capped
    x_hat, _ = churn(x, 1.0, 10, 2.0, 0.0, math.inf, 1.5, gen(1))  # S_noise scales the added noise
    assert x_hat.std().item() == pytest.approx(1.5 * math.sqrt(0.44), rel=0.05)
    g = gen(1)  # outside [S_tmin, S_tmax]: untouched, and no random draw is spent
    x_same, s_same = churn(x, 1.0, 10, 2.0, 2.0, 5.0, 1.0, g)
    assert x_same is x and s_same == 1.0
    assert torch.equal(torch.randn(3, generator=g), torch.randn(3, generator=gen(1)))


# --- the shared interface -----------------------------------------------------------------------

class Counting:
    def __init__(self, denoiser=gaussian_denoiser):
        self.calls, self.denoiser, self.seen = 0, denoiser, []

    def __call__(self, x, sigma, **cond):
        self.calls += 1
        self.seen.append((x.dtype, sigma.dtype, tuple(sigma.shape)))
        return self.denoiser(x, sigma)


@pytest.mark.parametrize("name", list(SAMPLERS))
@pytest.mark.parametrize("ends_at_zero", [True, False])
def test_nfe_counts_the_real_denoiser_calls(name, ends_at_zero):
    sigmas = sigmas_karras(9) if ends_at_zero else sigmas_karras(10)[:-1]
    counting = Counting()
    SAMPLERS[name](counting, _start(4), sigmas, generator=gen())
    assert counting.calls == nfe(name, 9, ends_at_zero=ends_at_zero)
    assert nfe("heun", 9) == 17 and nfe("euler", 9) == 9


DETERMINISTIC = ("lms", "ipndm", "dpmpp_2m", "unipc")  # whatever their options


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_same_seed_gives_identical_samples(name):
    options = {"s_churn": 10.0} if name in ("euler", "heun") else {"eta": 1.0} if name == "ddim" else {}
    sigmas, x = sigmas_karras(8), torch.randn(4, 1, 3, 3, generator=gen(9)) * 80.0
    a = SAMPLERS[name](mixture_denoiser, x, sigmas, generator=gen(3), **options)
    b = SAMPLERS[name](mixture_denoiser, x, sigmas, generator=gen(3), **options)
    assert torch.equal(a, b)
    if name in DETERMINISTIC:  # never draws: the generator comes back untouched
        g = gen(3)
        SAMPLERS[name](mixture_denoiser, x, sigmas, generator=g, **options)
        assert torch.equal(g.get_state(), gen(3).get_state())
    else:  # stochastic with these options: another seed differs
        assert not torch.equal(a, SAMPLERS[name](mixture_denoiser, x, sigmas, generator=gen(4), **options))


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_interface_dtype_callback_and_input_untouched(name):
    x = torch.randn(2, 1, 4, 4, generator=gen(1)) * 80.0
    x_copy, infos, counting = x.clone(), [], Counting()
    out = SAMPLERS[name](counting, x, sigmas_karras(6), generator=gen(2), callback=infos.append)
    assert out.dtype == torch.float32 and out.shape == x.shape and torch.equal(x, x_copy)
    # the denoiser sees x in the caller's dtype and sigma as a float64 (B,) tensor
    assert set(counting.seen) == {(torch.float32, F64, (2,))}
    assert [info["i"] for info in infos] == list(range(6))
    assert set(infos[0]) == {"i", "x", "sigma", "sigma_next", "denoised"}
    assert infos[0]["sigma"] == pytest.approx(80.0) and infos[-1]["sigma_next"] == 0.0
    assert torch.equal(infos[-1]["x"], out) and infos[0]["denoised"].shape == x.shape


def test_bad_sigmas_and_names_raise_config_error():
    x = torch.zeros(1, 1)
    for bad in ([1.0], [1.0, 2.0], [1.0, 1.0, 0.0], [1.0, -0.5], [float("nan"), 0.0]):
        with pytest.raises(ConfigError):
            sample_euler(gaussian_denoiser, x, torch.tensor(bad))
    with pytest.raises(ConfigError, match="euler_ancestral"):
        get_sampler("plms")
    with pytest.raises(ConfigError):
        sample_ddpm(gaussian_denoiser, x, sigmas_karras(3), variance="learned")
    with pytest.raises(ConfigError):
        nfe("plms", 10)


# --- diffusers as an independent implementation (test-only dependency) --------------------------
# The stand-in for a trained eps-network: the exact eps of the Gaussian data plus a nonlinear
# perturbation, so that samples stay O(1) and the comparison tolerances mean something.
# diffusers keeps its schedules and (for the k-diffusion-style schedulers) its sample in float32,
# hence the 1e-5 tolerances; observed max differences are 4e-10 .. 1.9e-6 (samples ~1).

# diffusers 0.42 + numpy 2 warn about `__array__(copy=...)` on every schedule: not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning:diffusers")


def _diffusers():
    try:
        import diffusers
    except Exception as err:  # any import failure means the oracle is missing
        pytest.fail(f"diffusers is needed for these tests ({err!r}); install the test extras: "
                    "pip install -e .[dev]")
    return diffusers


def eps_net(x_in: torch.Tensor, sigma) -> torch.Tensor:
    """eps_hat(x_t, sigma) for VP input x_t = x / sqrt(1 + sigma^2)."""
    sg = torch.as_tensor(sigma, dtype=x_in.dtype).reshape(-1, *([1] * (x_in.ndim - 1)))
    x = x_in * (1 + sg**2).sqrt()
    return (x - gaussian_denoiser(x, sg.flatten())) / sg + 0.05 * torch.sin(3 * x_in)


@pytest.fixture(scope="module")
def ddpm_setup():
    d = _diffusers()
    abar = d.DDPMScheduler(num_train_timesteps=1000).alphas_cumprod.double()
    # our side: the network is told the timestep, as a real DDPM network is
    denoiser = DDPMObjective(abar).denoiser(lambda x_in, t: eps_net(x_in, t_to_sigma(t, abar)))
    return d, abar, denoiser


def test_schedules_agree_with_diffusers(ddpm_setup):
    d, abar, _ = ddpm_setup
    assert torch.allclose(alpha_bars_linear(), abar, rtol=2e-6)  # diffusers keeps float32
    for spacing in ("leading", "trailing", "linspace"):
        for n in (1, 7, 50, 1000):
            sched = d.DDPMScheduler(num_train_timesteps=1000, timestep_spacing=spacing)
            sched.set_timesteps(n)
            assert ddpm_timesteps(n, 1000, spacing).tolist() == sched.timesteps.tolist(), (spacing, n)
    euler = d.EulerDiscreteScheduler(num_train_timesteps=1000, use_karras_sigmas=True)
    euler.set_timesteps(12)
    s = euler.sigmas.double()
    assert torch.allclose(sigmas_karras(12, s[-2].item(), s[0].item()), s, rtol=1e-6)


def _model_output(x_t, t, abar):
    return eps_net(x_t, sigma_from_alpha_bar(abar[int(t)]))


@pytest.mark.parametrize("variance", ["small", "large"])
@pytest.mark.parametrize("k", [0, 17, 48, 49])
def test_one_ddpm_step_matches_diffusers(ddpm_setup, variance, k):
    d, abar, denoiser = ddpm_setup
    sched = d.DDPMScheduler(num_train_timesteps=1000, clip_sample=False, variance_type=f"fixed_{variance}")
    sched.set_timesteps(50)
    sigmas = sigmas_ddpm(50, abar)
    t = int(sched.timesteps[k])
    abar_prev = abar[int(sched.timesteps[k + 1])].item() if k < 49 else 1.0
    assert sigmas[k].item() == sigma_from_alpha_bar(abar[t]).item()
    x_t = torch.randn(3, 2, 4, 4, generator=gen(k), dtype=F64) * math.sqrt(1 - abar[t].item()) + 0.3
    theirs = sched.step(_model_output(x_t, t, abar), t, x_t, generator=gen(100 + k)).prev_sample
    ours = sample_ddpm(denoiser, x_t / math.sqrt(abar[t].item()), sigmas[k:k + 2], generator=gen(100 + k),
                       variance=variance)
    assert torch.allclose(ours * math.sqrt(abar_prev), theirs, atol=1e-5, rtol=1e-5)


def test_whole_ddpm_chain_matches_diffusers(ddpm_setup):
    d, abar, denoiser = ddpm_setup
    sched = d.DDPMScheduler(num_train_timesteps=1000, clip_sample=False)
    sched.set_timesteps(40)
    x = x_start = torch.randn(2, 1, 4, 4, generator=gen(1), dtype=F64)
    g = gen(2)
    for t in sched.timesteps:
        x = sched.step(_model_output(x, t, abar), t, x, generator=g).prev_sample
    ours = sample_ddpm(denoiser, x_start / abar[sched.timesteps[0]].sqrt().item(), sigmas_ddpm(40, abar),
                       generator=gen(2))
    assert torch.allclose(ours, x, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_ddim_chain_matches_diffusers(ddpm_setup, eta, spacing):
    d, abar, denoiser = ddpm_setup
    sched = d.DDIMScheduler(num_train_timesteps=1000, clip_sample=False, timestep_spacing=spacing)
    sched.set_timesteps(25)
    x = x_start = torch.randn(2, 1, 4, 4, generator=gen(3), dtype=F64)
    g = gen(4)
    for t in sched.timesteps:
        x = sched.step(_model_output(x, t, abar), t, x, eta=eta, generator=g).prev_sample
    x_ve = x_start / abar[sched.timesteps[0]].sqrt().item()
    ours = sample_ddim(denoiser, x_ve, sigmas_ddpm(25, abar, spacing), eta=eta, generator=gen(4))
    assert torch.allclose(ours, x, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["euler", "heun", "lms", "dpmpp_2m", "euler_ancestral"])
def test_ode_and_ancestral_solvers_match_diffusers(ddpm_setup, name):
    """Same sigmas, same network, same noise. diffusers' k-diffusion-style schedulers run on the VE
    variable like ours; its DPM-Solver runs on the VP variable x / sqrt(1 + sigma^2)."""
    d, abar, denoiser = ddpm_setup
    karras = {"use_karras_sigmas": True}
    sched = {
        "euler": lambda: d.EulerDiscreteScheduler(**karras),
        "heun": lambda: d.HeunDiscreteScheduler(**karras),
        "lms": lambda: d.LMSDiscreteScheduler(**karras),
        "dpmpp_2m": lambda: d.DPMSolverMultistepScheduler(
            **karras, algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint"),
        "euler_ancestral": lambda: d.EulerAncestralDiscreteScheduler(),
    }[name]()
    sched.set_timesteps(20)
    x = torch.randn(2, 1, 4, 4, generator=gen(5), dtype=F64) * sched.sigmas[0].item()
    g, vp = gen(6), name == "dpmpp_2m"
    theirs = x / math.sqrt(1 + sched.sigmas[0].item() ** 2) if vp else x
    for i, t in enumerate(sched.timesteps):  # model call i is at sched.sigmas[i] (Heun's interleaved too)
        x_in = theirs if vp else sched.scale_model_input(theirs, t)
        out = eps_net(x_in, sched.sigmas[i].double())
        extra = {"generator": g} if name == "euler_ancestral" else {}
        theirs = sched.step(out, t, theirs, **extra).prev_sample
    sigmas = sched.sigmas.double()
    if name == "heun":  # diffusers interleaves the sigmas of Heun's two stages: s0, s1, s1, s2, s2, ..., 0
        sigmas = torch.cat([sigmas[:1], sigmas[1:-1:2], sigmas[-1:]])
    assert len(sigmas) == 21
    ours = SAMPLERS[name](denoiser, x, sigmas, generator=gen(6))
    assert ours.abs().max() < 5  # the chain ends at O(1) samples, not at a blown-up value
    assert torch.allclose(ours, theirs.double(), atol=1e-5, rtol=1e-5), (ours - theirs).abs().max()

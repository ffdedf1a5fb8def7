"""Classifier-free guidance: a denoiser wrapper, one batched call, exact at scale 0 and 1."""

from __future__ import annotations

import pytest
import torch

from minidiffusion.diffusion.guidance import cfg_denoiser
from minidiffusion.diffusion.samplers import sample_euler
from minidiffusion.diffusion.schedules import sigmas_karras
from minidiffusion.errors import ConfigError

F64 = torch.float64


class LabelDenoiser:
    """A class-conditional toy denoiser: pulls x towards a per-label mean; counts its calls."""

    def __init__(self):
        self.calls, self.batch_sizes = 0, []

    def __call__(self, x, sigma, label, shift=None):
        self.calls += 1
        self.batch_sizes.append(x.shape[0])
        sg = sigma.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        mean = (label.to(x.dtype) * 0.4 - 1.0).reshape(-1, *([1] * (x.ndim - 1)))
        if shift is not None:
            mean = mean + shift
        return (0.25 * x + sg**2 * mean) / (0.25 + sg**2) + 0.01 * torch.sin(x * label.reshape_as(mean))


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 1, 3, 3, generator=g, dtype=F64) * 2
    sigma = torch.tensor([0.5, 1.0, 2.0, 7.0], dtype=F64)
    return x, sigma, torch.tensor([1, 2, 3, 4]), torch.tensor([0, 0, 0, 0])


def test_scale_one_is_exactly_the_conditional_denoiser_and_skips_uncond(batch):
    x, sigma, label, null = batch
    d = LabelDenoiser()
    out = cfg_denoiser(d, {"label": label}, {"label": null}, 1.0)(x, sigma)
    assert torch.equal(out, LabelDenoiser()(x, sigma, label=label))
    assert d.calls == 1 and d.batch_sizes == [4]


def test_scale_zero_is_exactly_the_unconditional_denoiser(batch):
    x, sigma, label, null = batch
    out = cfg_denoiser(LabelDenoiser(), {"label": label}, {"label": null}, 0.0)(x, sigma)
    assert torch.equal(out, LabelDenoiser()(x, sigma, label=null))


@pytest.mark.parametrize("scale", [-1.0, 0.5, 3.0, 7.5])
def test_guided_is_the_linear_combination_from_one_batched_call(batch, scale):
    x, sigma, label, null = batch
    d = LabelDenoiser()
    out = cfg_denoiser(d, {"label": label}, {"label": null}, scale)(x, sigma)
    assert d.calls == 1 and d.batch_sizes == [8]  # [uncond; cond] in one call
    ref = LabelDenoiser()
    cond, uncond = ref(x, sigma, label=label), ref(x, sigma, label=null)
    assert torch.allclose(out, uncond + scale * (cond - uncond), atol=1e-14)


def test_negative_label_replaces_the_unconditional_branch_and_broadcasts(batch):
    x, sigma, label, _ = batch
    negative = torch.tensor([9])  # one negative label for the whole batch
    out = cfg_denoiser(LabelDenoiser(), {"label": label}, {"label": negative}, 4.0)(x, sigma)
    ref = LabelDenoiser()
    cond, neg = ref(x, sigma, label=label), ref(x, sigma, label=negative.expand(4))
    assert torch.allclose(out, neg + 4.0 * (cond - neg), atol=1e-14)
    # guidance pushes away from the negative label's mean (label 9 -> mean 2.6) compared with no guidance
    far = cfg_denoiser(LabelDenoiser(), {"label": label}, {"label": negative}, 1.0)(x, sigma)
    assert ((out - 2.6).abs().mean() > (far - 2.6).abs().mean()).item()


def test_shared_conditions_go_to_both_branches(batch):
    x, sigma, label, null = batch
    shift = torch.full((4, 1, 1, 1), 0.3, dtype=F64)
    out = cfg_denoiser(LabelDenoiser(), {"label": label}, {"label": null}, 2.0)(x, sigma, shift=shift)
    ref = LabelDenoiser()
    cond, uncond = ref(x, sigma, label=label, shift=shift), ref(x, sigma, label=null, shift=shift)
    assert torch.allclose(out, uncond + 2.0 * (cond - uncond), atol=1e-14)


def test_samplers_use_a_guided_denoiser_unchanged(batch):
    x, _, label, null = batch
    d = LabelDenoiser()
    out = sample_euler(cfg_denoiser(d, {"label": label}, {"label": null}, 3.0), x * 80, sigmas_karras(10))
    assert out.shape == x.shape and d.calls == 10 and set(d.batch_sizes) == {8}


def test_mismatched_conditions_raise_config_error(batch):
    x, sigma, label, null = batch
    with pytest.raises(ConfigError):
        cfg_denoiser(LabelDenoiser(), {"label": label}, {"text": null}, 2.0)
    with pytest.raises(ConfigError, match="batch size 3"):
        cfg_denoiser(LabelDenoiser(), {"label": label}, {"label": null[:3]}, 2.0)(x, sigma)


def test_gradient_guidance_matches_the_closed_form_on_a_gaussian():
    """Data N(0, s^2): D(x, sigma) = c x with c = s^2 / (s^2 + sigma^2). With log_prob(x0) = -(x0 - a)^2 / (2 tau^2),
    grad_x log_prob(D) = -c (c x - a) / tau^2, so D_guided = c x - scale sigma^2 c (c x - a) / tau^2."""
    from minidiffusion.diffusion.guidance import gradient_guidance

    s2, a, tau2, scale = 0.7, 1.5, 0.2, 3.0

    def denoiser(x, sigma):
        c = s2 / (s2 + sigma.reshape(-1, 1) ** 2)
        return c * x

    guided = gradient_guidance(denoiser, lambda x0: -((x0 - a) ** 2).sum(1) / (2 * tau2), scale)
    x = torch.randn(5, 1, dtype=torch.float64)
    sigma = torch.tensor([0.1, 0.5, 1.0, 2.0, 10.0], dtype=torch.float64)
    c = s2 / (s2 + sigma.reshape(-1, 1) ** 2)
    expected = c * x - scale * sigma.reshape(-1, 1) ** 2 * c * (c * x - a) / tau2
    with torch.no_grad():  # as samplers call it
        got = guided(x, sigma)
    assert torch.allclose(got, expected, atol=1e-12)
    assert gradient_guidance(denoiser, lambda x0: x0.sum(1), 0.0) is denoiser


def test_gradient_guidance_moves_samples_towards_what_the_scorer_likes():
    from minidiffusion.diffusion.guidance import gradient_guidance
    from minidiffusion.diffusion.samplers import sample_euler
    from minidiffusion.diffusion.schedules import sigmas_karras

    def denoiser(x, sigma):
        return x / (1 + sigma.reshape(-1, 1) ** 2)  # data N(0, 1)

    sigmas = sigmas_karras(30, 0.01, 20.0)
    x = torch.randn(2000, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * sigmas[0]
    plain = sample_euler(denoiser, x, sigmas)
    pushed = sample_euler(gradient_guidance(denoiser, lambda x0: x0.sum(1), 0.5), x, sigmas)
    assert abs(float(plain.mean())) < 0.1 and float(pushed.mean()) > 0.3  # pulled towards larger x0


def test_guidance_rescale_keeps_the_conditional_spread():
    torch.manual_seed(0)

    def denoiser(x, sigma, label):
        return 0.5 * x + label.reshape(-1, 1, 1).float()

    x, sigma = torch.randn(3, 4, 4), torch.full((3,), 2.0)
    cond, uncond = {"label": torch.tensor([1, 2, 3])}, {"label": torch.tensor([0])}
    plain = cfg_denoiser(denoiser, cond, uncond, 7.5)(x, sigma)
    assert torch.equal(cfg_denoiser(denoiser, cond, uncond, 7.5, rescale=0.0)(x, sigma), plain)
    full = cfg_denoiser(denoiser, cond, uncond, 7.5, rescale=1.0)(x, sigma)
    eps = (x - full) / 2.0
    eps_c = (x - denoiser(x, sigma, cond["label"])) / 2.0
    assert torch.allclose(eps.flatten(1).std(1), eps_c.flatten(1).std(1), rtol=1e-5)
    half = cfg_denoiser(denoiser, cond, uncond, 7.5, rescale=0.5)(x, sigma)
    assert torch.allclose(half, (plain + full) / 2, atol=1e-5)
    with pytest.raises(ValueError, match="rescale must be in"):
        cfg_denoiser(denoiser, cond, uncond, 7.5, rescale=2.0)


def test_classifier_steering_raises_the_target_class_probability():
    from minidiffusion.pipelines.steering import classifier_log_prob, classifier_steer

    torch.manual_seed(0)
    classifier = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))

    def denoiser(x, sigma):
        return x / (1 + sigma.reshape(-1, 1, 1, 1).to(x.dtype) ** 2)

    x, sigma = torch.randn(4, 1, 4, 4), torch.full((4,), 1.0, dtype=torch.float64)
    steer = classifier_steer(classifier, scale=2.0, target=2)
    with torch.no_grad():
        plain, pushed = denoiser(x, sigma), steer(denoiser)(x, sigma)
    log_p = classifier_log_prob(classifier, torch.full((4,), 2))
    assert (log_p(pushed) > log_p(plain)).all()
    with pytest.raises(ValueError, match="needs a target class"):
        classifier_steer(classifier, 1.0)(denoiser)(x, sigma)

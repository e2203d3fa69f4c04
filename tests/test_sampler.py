"""The denoising steps: exact log-probs, the a=0 limit, and an exact rollout on a toy."""
import math

import pytest
import torch

import sampler as S


def _state(seed=0, b=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 4, 8, 8, generator=g), torch.randn(b, 4, 8, 8, generator=g)


@pytest.mark.parametrize("sigma,sigma_next", [(1.0, 0.9), (0.7, 0.55), (0.3, 0.0)])
def test_sde_log_prob_is_normal_log_density(sigma, sigma_next):
    v, x = _state()
    x_next, lp, mean, std = S.sde_step(v, x, sigma, sigma_next, 0.7, "sde",
                                       generator=torch.Generator().manual_seed(1))
    ref = torch.distributions.Normal(mean, std.expand_as(mean)).log_prob(x_next).mean(dim=(1, 2, 3))
    assert lp.shape == (3,)
    torch.testing.assert_close(lp, ref, rtol=1e-5, atol=1e-5)
    # and scoring a given sample returns it unchanged with the same log-prob
    x2, lp2, _, _ = S.sde_step(v, x, sigma, sigma_next, 0.7, "sde", prev_sample=x_next)
    assert torch.equal(x2, x_next) and torch.allclose(lp2, lp)


def test_sde_sigma_one_uses_next_sigma_in_denominator():
    v, x = _state()
    _, _, _, std = S.sde_step(v, x, 1.0, 0.9, 0.7, "sde")
    assert torch.isfinite(std).all()
    assert math.isclose(float(std), 0.7 * math.sqrt(1.0 / (1 - 0.9)) * math.sqrt(0.1), rel_tol=1e-6)


def test_cps_log_prob_is_the_unscaled_surrogate():
    v, x = _state()
    x_next, lp, mean, std = S.sde_step(v, x, 0.6, 0.5, 0.8, "cps", generator=torch.Generator().manual_seed(2))
    assert math.isclose(float(std), 0.5 * math.sin(0.8 * math.pi / 2), rel_tol=1e-6)
    torch.testing.assert_close(lp, -((x_next - mean) ** 2).mean(dim=(1, 2, 3)))
    # the textbook CPS mean: (1-σn)·x̂0 + sqrt(σn² - s²)·x̂1
    x0, x1 = x - 0.6 * v, x + 0.4 * v
    torch.testing.assert_close(mean, 0.5 * x0 + math.sqrt(0.25 - float(std) ** 2) * x1, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["sde", "cps"])
def test_noise_zero_is_the_ode_step_exactly(kind):
    v, x = _state()
    sig = torch.tensor([1.0, 0.6, 0.2])          # per-sample sigmas, (B,)
    sig_next = torch.tensor([0.8, 0.4, 0.0])
    ode, _, _, _ = S.sde_step(v, x, sig, sig_next, 0.0, "ode")
    out, _, _, _ = S.sde_step(v, x, sig, sig_next, 0.0, kind, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, ode)
    torch.testing.assert_close(ode, x + (sig_next - sig).view(-1, 1, 1, 1) * v)


def test_ode_rollout_with_exact_velocity_recovers_x0():
    """Data = one point x0: the exact velocity is v = (x - x0)/σ and Euler is exact on it."""
    x0 = torch.randn(2, 4, 8, 8)
    sigmas = torch.linspace(1, 0, 11) ** 1.5     # any decreasing schedule ending at 0
    out = S.rollout(lambda x, s: (x - x0) / s, torch.randn(2, 4, 8, 8), sigmas, window_size=0)
    torch.testing.assert_close(out["latents"], x0, rtol=1e-5, atol=1e-5)


def test_ode_rollout_gaussian_toy_maps_noise_to_quantile():
    """Data N(m, c²): the flow maps ε to m + c·ε. 10 Euler steps with the exact velocity land close."""
    m, c = 0.5, 0.3
    eps = torch.randn(4, 4, 8, 8)

    def vel(x, s):  # E[ε - x0 | x_σ = x] for Gaussian data
        var = (1 - s) ** 2 * c ** 2 + s ** 2
        mu = (1 - s) * m
        e = s * (x - mu) / var                   # E[ε | x]
        x0 = m + (1 - s) * c ** 2 * (x - mu) / var
        return e - x0

    err = {n: (S.rollout(vel, eps, torch.linspace(1, 0, n + 1), window_size=0)["latents"]
               - (m + c * eps)).abs().max()
           for n in (10, 100)}
    assert err[10] < 0.1 * eps.abs().max()       # 10 steps: close
    assert err[100] < err[10] / 5                # and Euler converges to the exact map


def test_rollout_window_records_trained_steps():
    x0 = torch.zeros(2, 4, 8, 8)
    sigmas = torch.linspace(1, 0, 11)
    out = S.rollout(lambda x, s: (x - x0) / s.clamp(min=1e-3), torch.randn(2, 4, 8, 8), sigmas, kind="cps",
                    noise_level=0.8, window_start=3, window_size=2,
                    generator=torch.Generator().manual_seed(0))
    assert out["step_idx"].tolist() == [3, 4]
    assert out["x"].shape == (2, 2, 4, 8, 8) and out["log_probs"].shape == (2, 2)
    assert torch.equal(out["x"][:, 1], out["x_next"][:, 0])        # the window is contiguous
    # re-scoring the stored transition gives back the stored log-prob
    v = (out["x"][:, 0] - x0) / sigmas[3]
    _, lp, _, _ = S.sde_step(v, out["x"][:, 0], sigmas[3], sigmas[4], 0.8, "cps",
                             prev_sample=out["x_next"][:, 0])
    torch.testing.assert_close(lp, out["log_probs"][:, 0])
    with pytest.raises(ValueError, match="window"):
        S.rollout(lambda x, s: x, torch.randn(1, 4, 8, 8), sigmas, window_start=9, window_size=2)


def test_flow_sigmas_is_a_copy_not_the_schedulers_tensor():
    from diffusers import FlowMatchEulerDiscreteScheduler
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sigmas = S.flow_sigmas(sched, 10)
    before = sched.sigmas.clone()
    sigmas[0] = -1.0
    assert torch.equal(sched.sigmas, before) and sigmas.dtype == torch.float32 and len(sigmas) == 11

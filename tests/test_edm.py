"""EDM pieces: preconditioning, masked loss, sigma schedule, Heun sampler, classifier-free guidance."""
import math

import pytest
import torch

from microdit.edm import (EDMConfig, denoise, edm_loss, guided_denoise, heun_sampler, loss_weight, precondition,
                          sigma_steps)
from microdit.model import create_model, random_keep_ids


def tiny_model():
    model = create_model("MicroDiT_Nano_2", latent_res=8, in_channels=4, caption_channels=32)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


def test_preconditioning_formulas_of_edm_table_1():
    sd = 0.9
    for s in (0.002, 0.3, 0.9, 5.0, 80.0):
        c_skip, c_out, c_in, c_noise = precondition(torch.tensor(s, dtype=torch.float64), sd)
        assert math.isclose(c_skip, sd ** 2 / (s ** 2 + sd ** 2), rel_tol=1e-12)
        assert math.isclose(c_out, s * sd / math.sqrt(s ** 2 + sd ** 2), rel_tol=1e-12)
        assert math.isclose(c_in, 1 / math.sqrt(s ** 2 + sd ** 2), rel_tol=1e-12)
        assert math.isclose(c_noise, math.log(s) / 4, rel_tol=1e-12)
        assert math.isclose(loss_weight(torch.tensor(s, dtype=torch.float64), sd), (s ** 2 + sd ** 2) / (s * sd) ** 2,
                            rel_tol=1e-12)


def test_denoise_is_c_skip_x_plus_c_out_F_of_c_in_x():
    model = tiny_model()
    x, y = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 32)
    sigma = torch.tensor([0.5, 3.0])
    s = sigma.view(2, 1, 1, 1)
    c_skip, c_out = 0.81 / (s ** 2 + 0.81), s * 0.9 / (s ** 2 + 0.81).sqrt()
    c_in, c_noise = 1 / (s ** 2 + 0.81).sqrt(), sigma.log() / 4
    ref = c_skip * x + c_out * model(c_in * x, c_noise, y)
    torch.testing.assert_close(denoise(model, x, sigma, y, 0.9), ref, atol=1e-5, rtol=1e-5)


def test_masked_loss_is_mean_over_kept_patches():
    model = tiny_model()
    cfg = EDMConfig()
    x, y = torch.randn(3, 4, 8, 8), torch.randn(3, 5, 32)
    sigma = torch.tensor([0.2, 1.0, 7.0])
    loss = edm_loss(model, x, y, cfg, mask_ratio=0.75, generator=torch.Generator().manual_seed(11), sigma=sigma,
                    per_sample=True, patch_size=model.patch_size)
    # the same draws, in the same order: noise, then the kept tokens
    g = torch.Generator().manual_seed(11)
    noise = torch.randn(x.shape, generator=g) * sigma.view(3, 1, 1, 1)
    keep = random_keep_ids(3, 16, 0.75, generator=g)
    D = denoise(model, x + noise, sigma, y, 0.9, keep_ids=keep)
    manual = []
    for n in range(3):
        w = (sigma[n] ** 2 + 0.81) / (sigma[n] * 0.9) ** 2
        per_patch = []
        for t in keep[n].tolist():
            r, c = divmod(t, 4)
            patch = (D[n, :, 2 * r:2 * r + 2, 2 * c:2 * c + 2] - x[n, :, 2 * r:2 * r + 2, 2 * c:2 * c + 2]) ** 2
            per_patch.append(w * patch.mean())
        manual.append(torch.stack(per_patch).mean())
    torch.testing.assert_close(loss, torch.stack(manual), atol=1e-6, rtol=1e-5)
    assert loss.shape == (3,)
    batch_loss = edm_loss(model, x, y, cfg, 0.75, torch.Generator().manual_seed(11), sigma,
                          patch_size=model.patch_size)
    torch.testing.assert_close(batch_loss, loss.mean())


def test_unmasked_loss_is_mean_over_all_pixels_and_generator_makes_it_reproducible():
    model = tiny_model()
    cfg = EDMConfig()
    x, y = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 32)
    a = edm_loss(model, x, y, cfg, generator=torch.Generator().manual_seed(2))
    b = edm_loss(model, x, y, cfg, generator=torch.Generator().manual_seed(2))
    c = edm_loss(model, x, y, cfg, generator=torch.Generator().manual_seed(3))
    assert a == b and a != c
    g = torch.Generator().manual_seed(2)
    sigma = (torch.randn(2, generator=g) * cfg.P_std + cfg.P_mean).exp()
    noise = torch.randn(x.shape, generator=g) * sigma.view(2, 1, 1, 1)
    D = denoise(model, x + noise, sigma, y, 0.9)
    manual = (loss_weight(sigma.view(2, 1, 1, 1), 0.9) * (D - x) ** 2).mean()
    torch.testing.assert_close(a, manual, atol=1e-6, rtol=1e-5)


def test_sigma_schedule_endpoints_and_rho_spacing():
    cfg = EDMConfig()
    for n in (2, 18, 30):
        t = sigma_steps(n, cfg)
        assert t.shape == (n + 1,)
        assert math.isclose(t[0], 80.0, rel_tol=1e-12) and math.isclose(t[n - 1], 0.002, rel_tol=1e-9)
        assert t[n] == 0 and (t[1:] < t[:-1]).all()
        i = n // 2
        expected = (80 ** (1 / 7) + i / (n - 1) * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
        assert math.isclose(t[i], expected, rel_tol=1e-12)


class GaussianIdealDenoiser:
    """F such that c_skip x + c_out F = E[x0 | x] = x s^2 / (s^2 + sigma^2) for data ~ N(0, s^2)."""

    def __init__(self, data_std, sigma_data=0.9):
        self.s, self.sd = data_std, sigma_data

    def __call__(self, x_in, c_noise, y, mask_ratio=0.0, keep_ids=None):
        sigma = (4 * c_noise.double()).exp().view(-1, 1, 1, 1)
        x = x_in.double() * (sigma ** 2 + self.sd ** 2).sqrt()
        c_skip, c_out, _, _ = precondition(sigma, self.sd)
        ideal = x * self.s ** 2 / (self.s ** 2 + sigma ** 2)
        return ((ideal - c_skip * x) / c_out).float()


@pytest.mark.parametrize("data_std", [0.5, 1.7])
def test_heun_sampler_with_ideal_denoiser_recovers_gaussian_std(data_std):
    noise = torch.randn(64, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    y = torch.zeros(64, 1, 8)
    exact = 80 * data_std / math.sqrt(data_std ** 2 + 80 ** 2)     # the probability-flow ODE of a Gaussian is linear
    errors = []
    for steps in (30, 60):
        out = heun_sampler(GaussianIdealDenoiser(data_std), noise, y, num_steps=steps, guidance_scale=1.0)
        assert out.dtype == torch.float32 and out.shape == noise.shape
        ratio = out / noise                                           # every sample is the same multiple of its noise
        assert ratio.std() / ratio.mean() < 1e-3
        errors.append(abs(ratio.mean().item() / exact - 1))
        assert abs(out.std().item() / (noise.std().item() * data_std) - 1) < 0.03
    assert errors[0] < 0.03 and errors[1] < 0.008
    assert errors[1] < errors[0] / 3                                  # second order: halving steps ~ quarters error


def test_guidance_is_u_plus_s_times_c_minus_u_with_the_zero_caption():
    model = tiny_model()
    x, y = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 32)
    sigma = torch.tensor(2.0)
    cond = denoise(model, x, sigma, y, 0.9)
    uncond = denoise(model, x, sigma, torch.zeros_like(y), 0.9)
    assert not torch.allclose(cond, uncond)
    for s in (1.0, 3.0, 5.0):
        torch.testing.assert_close(guided_denoise(model, x, sigma, y, s, 0.9), uncond + s * (cond - uncond),
                                   atol=1e-5, rtol=1e-5)


def test_heun_sampler_runs_a_real_model_with_guidance():
    model = tiny_model()
    noise, y = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 32)
    steps = []
    out = heun_sampler(model, noise, y, num_steps=4, guidance_scale=5.0, progress=lambda it: (steps.append(1) or it))
    assert out.shape == noise.shape and torch.isfinite(out).all() and steps


def test_data_mean_centres_the_preconditioning_loss_and_sampler():
    """Data centred on m: D, the loss and the sampler are those of the data minus m, shifted back by m."""
    model, m = tiny_model(), 0.8
    x, y = torch.randn(3, 4, 8, 8) * 0.5 + m, torch.randn(3, 5, 32)
    sigma = torch.tensor([0.05, 1.0, 9.0])
    torch.testing.assert_close(denoise(model, x, sigma, y, 0.5, data_mean=m), m + denoise(model, x - m, sigma, y, 0.5),
                               atol=1e-5, rtol=1e-5)
    centred, plain = EDMConfig(sigma_data=0.5, data_mean=m), EDMConfig(sigma_data=0.5)
    a = edm_loss(model, x, y, centred, generator=torch.Generator().manual_seed(3), per_sample=True)
    b = edm_loss(model, x - m, y, plain, generator=torch.Generator().manual_seed(3), per_sample=True)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(a, edm_loss(model, x, y, plain, generator=torch.Generator().manual_seed(3),
                                          per_sample=True))
    noise = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(heun_sampler(model, noise, y, 4, 2.0, centred),
                               m + heun_sampler(model, noise, y, 4, 2.0, plain), atol=1e-4, rtol=1e-4)

"""Fréchet distance against a direct scipy computation, the FID resize, and the weight-free feature spaces."""
import numpy as np
import pytest
import torch
from PIL import Image
from scipy import linalg

from microdit.shapes import generate_shapes
from microdit.encoders import MissingWeightsError
from microdit.evaluate.frechet import (InceptionFeatures, RandomConvFeatures, clean_resize, extract_features,
                                       feature_stats, frechet_distance, load_feature_extractor)


def _random_cov(rng, d):
    a = rng.normal(size=(d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def test_matches_direct_scipy_formula_on_known_gaussians():
    rng = np.random.default_rng(0)
    for d in (1, 3, 16):
        mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
        s1, s2 = _random_cov(rng, d), _random_cov(rng, d)
        # direct: ||mu1-mu2||^2 + Tr(S1) + Tr(S2) - 2 Tr((S1^1/2 S2 S1^1/2)^1/2) (symmetric form)
        r1 = linalg.sqrtm(s1).real
        direct = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(linalg.sqrtm(r1 @ s2 @ r1).real)
        assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(direct, rel=1e-6, abs=1e-8)


def test_closed_forms_and_equal_distributions():
    # 1-D: (m1 - m2)^2 + (s1 - s2)^2
    assert frechet_distance([1.0], [[4.0]], [3.0], [[9.0]]) == pytest.approx(4 + 1)
    # diagonal covariances: sum over dimensions
    v1, v2 = np.array([1.0, 4.0, 9.0]), np.array([4.0, 4.0, 1.0])
    expected = 1.0 + ((np.sqrt(v1) - np.sqrt(v2)) ** 2).sum()
    assert frechet_distance(np.zeros(3), np.diag(v1), np.ones(3) / np.sqrt(3), np.diag(v2)) == pytest.approx(expected)
    rng = np.random.default_rng(1)
    mu, s = rng.normal(size=8), _random_cov(rng, 8)
    assert abs(frechet_distance(mu, s, mu, s)) < 1e-6
    # singular covariances (fewer samples than dimensions) still give a finite, ~0 self-distance
    x = rng.normal(size=(5, 10))
    m, c = feature_stats(x)
    assert abs(frechet_distance(m, c, m, c)) < 1e-4
    with pytest.raises(ValueError, match="shape"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))


def test_sample_statistics_converge_to_the_true_distance():
    rng = np.random.default_rng(2)
    d = 4
    mu1, mu2, s1, s2 = rng.normal(size=d), rng.normal(size=d), _random_cov(rng, d), _random_cov(rng, d)
    x1 = rng.multivariate_normal(mu1, s1, 40_000)
    x2 = rng.multivariate_normal(mu2, s2, 40_000)
    est = frechet_distance(*feature_stats(x1), *feature_stats(x2))
    assert est == pytest.approx(frechet_distance(mu1, s1, mu2, s2), rel=0.05)


def test_clean_resize_is_float_bicubic_and_keeps_range():
    im = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8))
    out = clean_resize(im, 29)
    assert out.shape == (29, 29, 3) and out.dtype == np.float32 and out.min() >= 0 and out.max() <= 255
    ref = np.asarray(Image.fromarray(np.asarray(im)[:, :, 1].astype(np.float32), mode="F").resize((29, 29), Image.BICUBIC))
    assert np.allclose(out[:, :, 1], np.clip(ref, 0, 255))
    flat = Image.new("RGB", (16, 16), (10, 200, 30))
    assert np.allclose(clean_resize(flat, 299), np.array([10, 200, 30], np.float32), atol=1e-3)


def test_random_conv_features_are_fixed_by_the_seed():
    x = torch.rand(4, 3, 32, 32) * 255
    a, b, c = RandomConvFeatures(seed=0), RandomConvFeatures(seed=0), RandomConvFeatures(seed=1)
    assert torch.equal(a(x), b(x)) and not torch.allclose(a(x), c(x))
    assert a(x).shape == (4, 64) and a.name == "randconv-d64-s32-seed0"
    assert load_feature_extractor("randconv:16:24:3").name == "randconv-d16-s24-seed3"


def test_shapes_fd_separates_real_from_wrong_images():
    ext = RandomConvFeatures()
    real_a = [s.image for s in generate_shapes(300, 32, seed=1)]
    real_b = [s.image for s in generate_shapes(300, 32, seed=2)]
    rng = np.random.default_rng(0)
    noise = [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(300)]
    blurred = [im.resize((8, 8), Image.BICUBIC).resize((32, 32), Image.BICUBIC) for im in real_b]
    fa, fb = feature_stats(extract_features(real_a, ext)), feature_stats(extract_features(real_b, ext))
    same = frechet_distance(*fa, *fb)
    to_blur = frechet_distance(*fa, *feature_stats(extract_features(blurred, ext)))
    to_noise = frechet_distance(*fa, *feature_stats(extract_features(noise, ext)))
    assert same < to_blur < to_noise and to_blur > 3 * same


def test_missing_inception_weights_say_what_to_do(tmp_path, monkeypatch):
    with pytest.raises(MissingWeightsError, match="inception|Inception"):
        InceptionFeatures(str(tmp_path / "nope.pt"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(MissingWeightsError, match="offline"):
        load_feature_extractor("inception")

"""Tests for the Fréchet distance (frechet.py) and the sliced Wasserstein distance (swd.py)."""

import numpy as np
import pytest
import scipy.linalg

from lapflow_jax.evaluation import frechet, swd


def _standard_fid(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """pytorch-fid's calculate_frechet_distance, written out directly with numpy/scipy."""
    diff = mu1 - mu2
    covmean = scipy.linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = scipy.linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    covmean = covmean.real
    return diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean)


def _feature_sets(n, d, seed):
    rng = np.random.default_rng(seed)
    mix_a = rng.normal(size=(d, d)) / np.sqrt(d)
    mix_b = mix_a + 0.3 * rng.normal(size=(d, d)) / np.sqrt(d)
    a = rng.normal(size=(n, d)) @ mix_a
    b = rng.normal(size=(n, d)) @ mix_b + 0.2
    return a, b


@pytest.mark.parametrize("n, d", [(400, 32), (20, 48)], ids=["full_rank", "rank_deficient"])
def test_frechet_matches_standard_computation(n, d):
    a, b = _feature_sets(n, d, seed=n)
    mu_a, sigma_a = frechet.feature_stats(a)
    np.testing.assert_allclose(mu_a, a.mean(0))
    np.testing.assert_allclose(sigma_a, np.cov(a, rowvar=False))
    mu_b, sigma_b = frechet.feature_stats(b)
    want = _standard_fid(mu_a, sigma_a, mu_b, sigma_b)
    got = frechet.frechet_distance(mu_a, sigma_a, mu_b, sigma_b)
    assert want > 1.0
    assert abs(got - want) < 1e-6 * want, (got, want)
    assert abs(frechet.frechet_distance(mu_a, sigma_a, mu_b, sigma_b, method="sqrtm") - want) < 1e-9 * want
    assert frechet.fid_from_features(a, b) == pytest.approx(got, rel=1e-12)


def test_frechet_known_value_and_self_distance():
    # Diagonal Gaussians: d^2 = |mu1 - mu2|^2 + sum (sqrt(s1) - sqrt(s2))^2.
    s1, s2 = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 9.0])
    mu1, mu2 = np.zeros(3), np.array([1.0, 2.0, 0.0])
    got = frechet.frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2))
    assert got == pytest.approx(5.0 + 1.0 + 1.0 + 0.0, rel=1e-12)
    a, _ = _feature_sets(50, 64, seed=3)  # singular covariance: 50 samples in 64-d
    assert frechet.fid_from_features(a, a) < 1e-8


def test_stats_round_trip_and_errors(tmp_path):
    a, _ = _feature_sets(30, 8, seed=4)
    mu, sigma = frechet.feature_stats(a)
    path = tmp_path / "ref_stats.npz"
    frechet.save_stats(path, mu, sigma)
    assert path.exists()
    mu2, sigma2 = frechet.load_stats(path)
    np.testing.assert_array_equal(mu2, mu)
    np.testing.assert_array_equal(sigma2, sigma)
    np.savez(tmp_path / "bad.npz", mean=mu)
    with pytest.raises(ValueError, match="lacks \\['mu', 'sigma'\\]"):
        frechet.load_stats(tmp_path / "bad.npz")
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        frechet.load_stats(tmp_path / "missing.npz")
    with pytest.raises(ValueError, match="N >= 2"):
        frechet.feature_stats(a[:1])
    with pytest.raises(ValueError, match="feature sizes differ"):
        frechet.frechet_distance(mu, sigma, mu[:4], sigma[:4, :4])
    with pytest.raises(ValueError, match="method"):
        frechet.frechet_distance(mu, sigma, mu, sigma, method="svd")


@pytest.fixture(scope="module")
def crops():
    """16 real 64x64 RGB crops in [-1, 1] from scikit-image's bundled photos."""
    from skimage import data, transform

    out = []
    for name in ("astronaut", "chelsea", "coffee", "rocket"):
        img = transform.resize(getattr(data, name)(), (128, 128), anti_aliasing=True)
        out += [img[y : y + 64, x : x + 64] for y in (0, 64) for x in (0, 64)]
    return np.stack(out).astype(np.float32) * 2.0 - 1.0


def _noisy(images, level, seed=0):
    noise = np.random.default_rng(seed).normal(size=images.shape).astype(np.float32)
    return np.clip(images + level * noise, -1.0, 1.0)


def test_fid_on_efficientnet_features_grows_with_noise(crops):
    from lapflow_jax.evaluation import efficientnet

    model = efficientnet.load_efficientnet_lite0()
    levels = (0.0, 0.05, 0.15, 0.4)
    images = crops[::2]  # 8 images keep it quick; the gaps between levels are ~2x
    # One call, one compiled shape: all noise levels in a single batch.
    batch = np.concatenate([_noisy(images, s) for s in levels])
    feats = efficientnet.features(model, batch, batch_size=len(batch)).reshape(len(levels), len(images), -1)
    fids = [frechet.fid_from_features(feats[0], f) for f in feats]
    assert fids[0] < 1e-6 * fids[1]
    assert all(x < y for x, y in zip(fids, fids[1:])), fids


def test_swd_identical_sets_is_zero_and_grows_with_noise(crops):
    kwargs = dict(seed=1, patches_per_image=64, dirs_per_repeat=64)
    same = swd.swd(crops, crops.copy(), **kwargs)
    assert sorted(same) == ["swd_16", "swd_32", "swd_64", "swd_avg"]
    assert max(same.values()) < 1e-9
    values = [swd.swd(crops, _noisy(crops, s), **kwargs)["swd_avg"] for s in (0.02, 0.1, 0.3)]
    assert 0 < values[0] < values[1] < values[2], values
    # Fine-scale noise shows most in the finest band.
    noisy = swd.swd(crops, _noisy(crops, 0.3), **kwargs)
    assert noisy["swd_64"] > noisy["swd_16"]


def test_swd_is_deterministic_by_seed(crops):
    other = _noisy(crops, 0.1, seed=5)
    first = swd.swd(crops, other, seed=3, patches_per_image=32, dirs_per_repeat=32)
    assert swd.swd(crops, other, seed=3, patches_per_image=32, dirs_per_repeat=32) == first
    different = swd.swd(crops, other, seed=4, patches_per_image=32, dirs_per_repeat=32)
    assert different != first
    assert different["swd_avg"] == pytest.approx(first["swd_avg"], rel=0.5)


def test_sliced_wasserstein_known_1d_cases():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(1000, 1))
    # A shift by c moves every sorted point by c: W1 = c, whatever the direction sign.
    shifted = rng.permutation(a + 0.7)
    assert swd.sliced_wasserstein(a, shifted, rng=rng) == pytest.approx(0.7, rel=1e-5)
    # Scaling by 3 around 0: W1 = mean |3a - a| over sorted pairs = 2 mean |a|.
    assert swd.sliced_wasserstein(a, 3 * a, rng=rng) == pytest.approx(2 * np.abs(a).mean(), rel=1e-5)
    # In D dims, a shift c along one axis projects to |c u_0| on a unit direction u.
    pts = rng.normal(size=(500, 3))
    value = swd.sliced_wasserstein(pts, pts + [2.0, 0, 0], num_repeats=2, dirs_per_repeat=4096, rng=rng)
    assert value == pytest.approx(2.0 * 0.5, rel=0.05)  # E|u_0| = 1/2 on the 2-sphere


def test_laplacian_pyramid_reconstructs_and_errors(crops):
    levels = swd.laplacian_pyramid(crops, 3)
    assert [lv.shape[1] for lv in levels] == [64, 32, 16]
    rebuilt = levels[-1]
    for band in reversed(levels[:-1]):
        rebuilt = band + swd._pyr_up(rebuilt)
    np.testing.assert_allclose(rebuilt, crops, atol=1e-5)
    # Band-pass levels of a smooth image carry little energy compared with the low-pass.
    assert np.abs(levels[0]).mean() < np.abs(levels[-1]).mean()
    with pytest.raises(ValueError, match="divisible by 4"):
        swd.laplacian_pyramid(np.zeros((1, 30, 32, 3)), 3)
    with pytest.raises(ValueError, match="one shape"):
        swd.swd(crops, crops[:3])


# ----------------------------------------------------------------------------------------------
# Logging helpers of lapflow_jax/metrics.py: interval means and the progress / ETA lines.


def test_interval_mean_averages_losses_and_grad_norm_then_starts_over():
    from lapflow_jax import metrics as metrics_lib

    mean = metrics_lib.IntervalMean()
    mean.add({"loss": 1.0, "loss_scale0": 2.0, "grad_norm": 3.0, "learning_rate": 5.0})
    mean.add({"loss": 2.0, "loss_scale0": 4.0, "grad_norm": 1.0, "learning_rate": 6.0})
    assert mean.pop() == {"loss": 1.5, "loss_scale0": 3.0, "grad_norm": 2.0}  # not the learning rate
    assert mean.pop() == {}
    mean.add({"loss": 7.0})
    assert mean.pop() == {"loss": 7.0}


def test_progress_lines_rate_and_eta(monkeypatch, caplog):
    """A fake clock: the first batch's line gives its time (compilation) and no ETA; then a line at
    most every `every_s` seconds and for the last batch, with the rate since the previous line."""
    import logging
    import types

    from lapflow_jax import metrics as metrics_lib

    clock = [100.0]
    monkeypatch.setattr(metrics_lib, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    caplog.set_level(logging.INFO)
    progress = metrics_lib.Progress("sampling", 5, items_per_batch=4, every_s=10.0)
    seen = {}
    for done, now in ((1, 130.0), (2, 132.0), (3, 134.0), (4, 141.0), (5, 145.0)):
        clock[0] = now
        seen[done] = progress.update(done, note="x")
    assert seen[1] == {"seconds_first_batch": 30.0, "note": "x"}
    assert seen[2] == seen[3] == {}  # within 10 s of the previous line
    # Batches 2-4 in 11 s: 3.67 s a batch, 1 batch left.
    np.testing.assert_allclose([seen[4]["seconds_per_batch"], seen[4]["images_per_s"], seen[4]["eta_s"]],
                               [11 / 3, 12 / 11, 11 / 3])
    np.testing.assert_allclose([seen[5]["seconds_per_batch"], seen[5]["eta_s"]], [4.0, 0.0])
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("sampling:")]
    assert lines == ["sampling: batch 1/5 | 30.00 s (with compilation) | note x",
                     "sampling: batch 4/5 | 3.67 s/batch | 1.09 images/s | ETA 0:00:03 | note x",
                     "sampling: batch 5/5 | 4 s/batch | 1 images/s | ETA 0:00:00 | note x"]

"""ADM's metrics beside FID, checked against an independent implementation, torch-fidelity 0.4.0:
the Inception Score over splits of 5,000 (evaluation/inception_score.py), improved precision and
recall with k = 3 (evaluation/precision_recall.py), and the Fréchet distance of streamed statistics
(sFID's computation; its layer is checked in test_inception.py).

torch-fidelity's package __init__ imports torchvision (not installed): its metric modules are
loaded under a bare package stub, with its input-pipeline module `utils` stubbed (the functions
compared here do not use it)."""

import importlib
import sys
import types

import numpy as np
import pytest
import torch

from lapflow_jax.evaluation import frechet, inception_score, precision_recall


@pytest.fixture(scope="module")
def torch_fidelity():
    import test_inception

    test_inception._load_torch_fidelity_blocks()  # the package stub
    if "torch_fidelity.utils" not in sys.modules:
        utils = types.ModuleType("torch_fidelity.utils")
        utils.__getattr__ = lambda name: None  # any input-pipeline name the metric modules import
        sys.modules["torch_fidelity.utils"] = utils
    return types.SimpleNamespace(**{m: importlib.import_module(f"torch_fidelity.metric_{m}")
                                    for m in ("isc", "prc", "fid")})


def _logits(n, classes=1008, seed=0):
    """Peaked, class-structured logits: the score depends clearly on how many rows a split holds."""
    rng = np.random.default_rng(seed)
    return (3.0 * rng.normal(size=(n, classes)) + 2.0 * rng.normal(size=(1, classes))).astype(np.float32)


def test_inception_score_is_adms_splits_of_5000_as_torch_fidelity_computes_them(torch_fidelity):
    """10,000 samples: ADM's split size 5,000 gives 2 splits in index order; torch-fidelity with
    splits=2 and no shuffle computes the same mean of exp(mean KL) (in float64 throughout)."""
    logits = _logits(10_000)
    ours = inception_score.inception_score(logits)
    theirs = torch_fidelity.isc.isc_features_to_metric(torch.from_numpy(logits), splits=2,
                                                       shuffle=False)["inception_score_mean"]
    print(f"IS ours {ours:.12f} torch-fidelity {theirs:.12f}")
    assert ours == pytest.approx(theirs, rel=1e-12)
    # Another split count is another number (10 splits of 1,000: torch-fidelity's default count).
    ten = torch_fidelity.isc.isc_features_to_metric(torch.from_numpy(logits), splits=10,
                                                    shuffle=False)["inception_score_mean"]
    assert abs(ten - ours) > 0.01 * ours
    # Streaming: pieces in any order give the same score.
    score = inception_score.InceptionScore(10_000)
    order = np.random.default_rng(1).permutation(10_000)
    for piece in np.array_split(order, 7):
        score.add(piece, logits[piece])
    assert score.result() == pytest.approx(ours, rel=1e-12)
    # N not a multiple of 5,000: ADM's last split is the remainder (2 splits for 7,000 rows).
    part = logits[:7000]
    want = np.mean([torch_fidelity.isc.isc_features_to_metric(torch.from_numpy(p), splits=1, shuffle=False)[
        "inception_score_mean"] for p in (part[:5000], part[5000:])])
    assert inception_score.inception_score(part) == pytest.approx(want, rel=1e-12)


def test_precision_recall_is_k3_as_torch_fidelity_computes_it(torch_fidelity):
    """Precision (samples inside the reference's k-NN balls) and recall (the reverse), k = 3 with
    each point its own 0-th neighbour, in blocks smaller than the sets: exactly torch-fidelity's
    fractions (Euclidean distances there, squared here: the same balls)."""
    rng = np.random.default_rng(2)
    reference = rng.normal(size=(700, 32)).astype(np.float32)
    samples = (1.3 * rng.normal(size=(500, 32)) + 0.3).astype(np.float32)
    ours = precision_recall.precision_recall(reference, samples, block=256)
    theirs = torch_fidelity.prc.calculate_precision_recall_full(torch.from_numpy(samples),
                                                                torch.from_numpy(reference), neighborhood=3)
    print(f"P/R ours {ours} torch-fidelity {theirs}")
    assert 0.05 < ours[0] < 0.95 and 0.05 < ours[1] < 0.99  # neither saturated
    assert ours == pytest.approx(theirs, abs=1e-6)  # the same counts (float32 means there)
    for k in (2, 4):  # another neighbourhood size is another answer
        other = torch_fidelity.prc.calculate_precision_recall_full(torch.from_numpy(samples),
                                                                   torch.from_numpy(reference), neighborhood=k)
        assert max(abs(other[0] - ours[0]), abs(other[1] - ours[1])) > 0.005, (k, other, ours)
    with pytest.raises(ValueError, match="need > 3"):
        precision_recall.precision_recall(reference[:3], samples)


def test_frechet_of_streamed_statistics_is_torch_fidelitys(torch_fidelity):
    """sFID's computation: statistics accumulated in pieces and out of order (RunningStats), then
    the Fréchet distance, against torch-fidelity's statistics and distance of all rows at once
    (spatial-like features: 7x7 positions of 1 channel)."""
    rng = np.random.default_rng(3)
    mix = rng.normal(size=(49, 49)) / 7.0
    a = (rng.normal(size=(900, 49)) @ mix + np.maximum(rng.normal(size=(1, 49)), 0)).astype(np.float32)
    b = (rng.normal(size=(800, 49)) @ (mix + 0.2 * rng.normal(size=(49, 49)) / 7.0) + 0.1).astype(np.float32)
    stats = []
    for x in (a, b):
        running = frechet.RunningStats(49)
        for piece in np.array_split(rng.permutation(len(x)), 5):
            running.add(x[piece])
        stats.append(running.stats())
    mu, sigma = frechet.feature_stats(a)
    np.testing.assert_allclose(stats[0][0], mu, rtol=0, atol=1e-12)
    np.testing.assert_allclose(stats[0][1], sigma, rtol=0, atol=1e-12)
    ours = frechet.frechet_distance(*stats[0], *stats[1])
    theirs = torch_fidelity.fid.fid_statistics_to_metric(
        torch_fidelity.fid.fid_features_to_statistics(torch.from_numpy(a).double()),
        torch_fidelity.fid.fid_features_to_statistics(torch.from_numpy(b).double()), verbose=False)["frechet_inception_distance"]
    print(f"FD ours {ours:.12f} torch-fidelity {theirs:.12f}")
    assert ours == pytest.approx(theirs, rel=1e-9)

"""Tests for the EfficientNet-Lite0 port (lapflow_jax.evaluation.efficientnet).

Reference: the package's own torch model code (efficientnet-lite-pytorch) holding the same real
ImageNet weights, read with our restricted reader (never torch.load).
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lapflow_jax.evaluation import efficientnet
from lapflow_jax.evaluation.torch_weights import load_torch_state_dict

REL_TOL = 1e-4  # relative max-abs difference of pooled features between the two frameworks


@pytest.fixture(scope="module")
def models():
    from efficientnet_lite_pytorch import EfficientNet

    reference = EfficientNet.from_name("efficientnet-lite0")
    state = load_torch_state_dict(efficientnet.packaged_weights_path())
    reference.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=True)
    reference.eval()
    return reference, efficientnet.load_efficientnet_lite0()


@pytest.fixture(scope="module")
def photos():
    from skimage import data, transform

    names = ("chelsea", "coffee", "astronaut", "rocket")
    # A common non-square size, so that features() has to resize (with antialiasing) to 224.
    imgs = [transform.resize(getattr(data, n)(), (240, 300), anti_aliasing=True) for n in names]
    return names, (np.stack(imgs).astype(np.float32) * 2.0 - 1.0).clip(-1.0, 1.0)


def _torch_pooled(reference, images):
    x = torch.from_numpy(images).permute(0, 3, 1, 2)
    x = F.interpolate(x, size=(224, 224), mode="bilinear", align_corners=False, antialias=True)
    x = (255.0 * (x + 1.0) / 2.0 - 127.0) / 128.0
    with torch.no_grad():
        return F.adaptive_avg_pool2d(reference.extract_features(x), 1).flatten(1).numpy()


@pytest.fixture(scope="module")
def photo_features(models, photos):
    _, ours = models
    return efficientnet.features(ours, photos[1])


def test_features_match_package_model_on_photos(models, photos, photo_features):
    reference, _ = models
    got = photo_features
    want = _torch_pooled(reference, photos[1])
    assert got.shape == (4, 1280) and got.dtype == np.float32
    rel = np.abs(got - want).max() / np.abs(want).max()
    assert rel < REL_TOL, f"relative max abs difference {rel:.2e}"
    # Different photos give clearly different features.
    assert np.abs(got[0] - got[1]).max() > 0.1 * np.abs(want).max()


def test_real_weights_classify_photos(models, photos, photo_features):
    _, ours = models
    names, _ = photos
    top = np.asarray(ours.logits(photo_features)).argmax(-1)
    assert names[:2] == ("chelsea", "coffee")
    assert 281 <= top[0] <= 285, f"chelsea classified as {top[0]}, expected a domestic cat class"
    assert top[1] in (967, 968), f"coffee classified as {top[1]}, expected espresso or cup"


def test_batching_and_grayscale(models, photos, photo_features):
    _, ours = models
    _, images = photos
    batched = efficientnet.features(ours, images, batch_size=3)  # 3 + 1 padded to 3
    np.testing.assert_allclose(batched, photo_features, rtol=0, atol=1e-4 * np.abs(photo_features).max())
    gray = images.mean(axis=-1, keepdims=True)
    np.testing.assert_allclose(
        efficientnet.features(ours, gray), efficientnet.features(ours, np.repeat(gray, 3, -1)), atol=1e-6
    )


def test_bad_inputs_raise(models, tmp_path):
    _, ours = models
    with pytest.raises(ValueError, match="\\[-1, 1\\]"):
        efficientnet.features(ours, np.full((1, 16, 16, 3), 2.0, np.float32))
    with pytest.raises(ValueError, match="float"):
        efficientnet.features(ours, np.zeros((1, 16, 16, 3), np.uint8))
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        efficientnet.load_efficientnet_lite0(tmp_path / "nope.pth")
    with pytest.raises(ValueError, match="_conv_stem.weight"):
        efficientnet.convert_state_dict({"_conv_stem.weight": np.zeros((32, 3, 5, 5), np.float32)})

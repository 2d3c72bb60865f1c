"""Tests for the FID InceptionV3 port (lapflow_jax.evaluation.inception).

The reference is a torch network: pytorch-fid's layout (stem, F.interpolate resize, pool3)
assembled from torch-fidelity's own block classes (its BasicConv2d, InceptionA..E_2 are
pytorch-fid's FID blocks). torch-fidelity's package __init__ imports torchvision, which is not
installed, so its module file is loaded directly under a bare package stub.
"""

import functools
import importlib
import importlib.util
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx

from lapflow_jax.evaluation import inception

# Random-weight features of both frameworks agree to this relative max-abs difference; float32
# reordering in ~100 layers typically lands near 1e-6.
REL_TOL = 1e-4


@functools.cache
def _load_torch_fidelity_blocks():
    if "torch_fidelity" not in sys.modules:
        spec = importlib.util.find_spec("torch_fidelity")
        if spec is None or not spec.submodule_search_locations:
            pytest.skip("torch_fidelity is not installed")
        stub = types.ModuleType("torch_fidelity")
        stub.__path__ = [str(Path(list(spec.submodule_search_locations)[0]))]  # submodules import; __init__ never runs
        sys.modules["torch_fidelity"] = stub
    root = Path(sys.modules["torch_fidelity"].__path__[0])
    name = "torch_fidelity.feature_extractor_inceptionv3"
    file_spec = importlib.util.spec_from_file_location(name, root / "feature_extractor_inceptionv3.py")
    module = importlib.util.module_from_spec(file_spec)
    file_spec.loader.exec_module(module)
    return module


class _TorchFIDInception(torch.nn.Module):
    """pytorch-fid's InceptionV3(resize_input=True) pool3 path, inputs already in [-1, 1]."""

    def __init__(self, tf):
        super().__init__()
        self.Conv2d_1a_3x3 = tf.BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = tf.BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = tf.BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = tf.BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = tf.BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = tf.InceptionA(192, pool_features=32)
        self.Mixed_5c = tf.InceptionA(256, pool_features=64)
        self.Mixed_5d = tf.InceptionA(288, pool_features=64)
        self.Mixed_6a = tf.InceptionB(288)
        self.Mixed_6b = tf.InceptionC(768, channels_7x7=128)
        self.Mixed_6c = tf.InceptionC(768, channels_7x7=160)
        self.Mixed_6d = tf.InceptionC(768, channels_7x7=160)
        self.Mixed_6e = tf.InceptionC(768, channels_7x7=192)
        self.Mixed_7a = tf.InceptionD(768)
        self.Mixed_7b = tf.InceptionE_1(1280)
        self.Mixed_7c = tf.InceptionE_2(2048)
        self.fc = torch.nn.Linear(2048, 1008)

    def forward(self, x):
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, "Mixed_" + name)(x)
        return F.adaptive_avg_pool2d(x, (1, 1)).flatten(1)


def _randomise(net: torch.nn.Module, seed: int) -> None:
    """He-scaled convs and non-trivial BatchNorm statistics, so activations stay O(1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, torch.nn.Conv2d):
                fan_in = module.weight[0].numel()
                module.weight.copy_(torch.randn(module.weight.shape, generator=g) * (2.0 / fan_in) ** 0.5)
            elif isinstance(module, torch.nn.BatchNorm2d):
                c = module.num_features
                module.weight.copy_(0.8 + 0.4 * torch.rand(c, generator=g))
                module.bias.copy_(0.1 * torch.randn(c, generator=g))
                module.running_mean.copy_(0.1 * torch.randn(c, generator=g))
                module.running_var.copy_(0.5 + torch.rand(c, generator=g))
    net.eval()


def write_random_fid_weights(path: Path, seed: int = 1) -> torch.nn.Module:
    """Saves a random-weight FID InceptionV3 at `path` as torch.save writes pytorch-fid's
    pt_inception-2015-12-05-6726825d.pth (same names and shapes, 95 MB); returns the torch network.

    Also used by tests/rehearse.py, whose eval step computes FID with this file from the bucket.
    """
    torch.manual_seed(0)
    reference = _TorchFIDInception(_load_torch_fidelity_blocks())
    _randomise(reference, seed=seed)
    torch.save(reference.state_dict(), path)
    return reference


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """(the torch network, the path of its random weights saved as torch.save writes them)."""
    path = tmp_path_factory.mktemp("inception") / "random_fid_inception.pth"
    return write_random_fid_weights(path), path


@pytest.fixture(scope="module")
def models(weights):
    reference, path = weights
    # Through a real file, in the zip format torch.save writes, read back without torch.
    return reference, inception.load_fid_inception(path)


def _torch_features(reference, images_nhwc):
    with torch.no_grad():
        return reference(torch.from_numpy(images_nhwc).permute(0, 3, 1, 2).contiguous()).numpy()


def _assert_close(ours, theirs):
    assert ours.shape == theirs.shape
    scale = np.abs(theirs).max()
    assert scale > 1e-3  # the random network must not have collapsed to zeros
    rel = np.abs(ours - theirs).max() / scale
    assert rel < REL_TOL, f"relative max abs difference {rel:.2e}"


def test_features_match_torch_at_299(models):
    reference, ours = models
    images = np.random.default_rng(0).uniform(-1, 1, (2, 299, 299, 3)).astype(np.float32)
    got = inception.fid_features(ours, images)
    assert got.shape == (2, 2048) and got.dtype == np.float32
    _assert_close(got, _torch_features(reference, images))


def test_features_match_torch_after_resize_from_64(models):
    from skimage import data, transform

    reference, ours = models
    # Real photo content (smooth regions and edges) exercises the resize better than noise.
    photos = [transform.resize(img, (64, 64), anti_aliasing=True) for img in (data.astronaut(), data.chelsea())]
    images = (np.stack(photos).astype(np.float32) * 2.0 - 1.0).clip(-1, 1)
    got = inception.fid_features(ours, images)
    _assert_close(got, _torch_features(reference, images))


@pytest.mark.parametrize(
    "size_in, size_out, antialias",
    [((64, 48), (299, 299), False), ((300, 257), (299, 128), False), ((300, 257), (224, 100), True)],
)
def test_resize_matches_torch_interpolate(size_in, size_out, antialias):
    x = np.random.default_rng(1).normal(size=(2,) + size_in + (3,)).astype(np.float32)
    want = F.interpolate(
        torch.from_numpy(x).permute(0, 3, 1, 2), size=size_out, mode="bilinear",
        align_corners=False, antialias=antialias,
    ).permute(0, 2, 3, 1).numpy()  # fmt: skip
    got = np.asarray(inception.resize_bilinear(x, *size_out, antialias=antialias))
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=0)


def test_bad_inputs_raise(models, tmp_path):
    _, ours = models
    with pytest.raises(ValueError, match="\\[-1, 1\\]"):
        inception.fid_features(ours, np.full((1, 8, 8, 3), 255.0, np.float32))
    with pytest.raises(ValueError, match="N, H, W, 3"):
        inception.fid_features(ours, np.zeros((8, 8, 3), np.float32))
    with pytest.raises(FileNotFoundError, match="pt_inception"):
        inception.load_fid_inception(tmp_path / "nope.pth")
    with pytest.raises(KeyError, match="Mixed_5b.extra"):
        inception.convert_state_dict({"Mixed_5b.extra.weight": np.zeros(3)}, model=ours)


def _photos_uint8(size):
    from PIL import Image
    from skimage import data

    return np.stack([np.asarray(Image.fromarray(img).resize((size, size), Image.BICUBIC))
                     for img in (data.astronaut(), data.chelsea())])


def test_adm_features_match_torch_fidelity_extractor(weights, models):
    """ADM's three outputs with the TensorFlow preprocessing, against torch-fidelity's InceptionV3
    feature extractor on the same random weights: its TF1-exact resize of the 0..255 image and
    (x - 128) / 128 (as the graph), its '2048' (pool_3) and 'logits_unbiased' (softmax/logits/MatMul,
    ADM's Inception Score input), and Mixed_6d.branch1x1 (the graph's mixed_6/conv, ADM's sFID
    layer) read with a forward hook, its first 7 channels flattened in (h, w, c) order."""
    module = _load_torch_fidelity_blocks()
    _, path = weights
    _, ours = models
    extractor = module.FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                                   feature_extractor_weights_path=str(path))
    captured = {}
    extractor.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: captured.update(spatial=o))
    pixels = _photos_uint8(64)
    with torch.no_grad():
        pool, logits = extractor(torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous())
    spatial = captured["spatial"][:, :inception.SPATIAL_CHANNELS].permute(0, 2, 3, 1).reshape(len(pixels), -1)
    embed = nnx.jit(lambda model, x: inception.embed(model, x, "tensorflow"))
    got = {k: np.asarray(v) for k, v in embed(ours, pixels).items()}
    assert got["spatial"].shape == (2, inception.SPATIAL_DIM) == tuple(spatial.shape)
    _assert_close(got["pool"], pool.numpy())
    _assert_close(got["logits"], logits.numpy())
    _assert_close(got["spatial"], spatial.numpy())


def test_tf1_resize_matches_tensorflow_and_torch_fidelity():
    """resize_bilinear_tf1 against TensorFlow 2.21's tf.compat.v1.image.resize_bilinear
    (align_corners=False, half_pixel_centers=False), whose outputs for a small input are stored in
    tests/data (made once in a separate venv: TensorFlow is no dependency), and against
    torch-fidelity's TF1-compatible interpolation at the FID size."""
    stored = np.load(Path(__file__).parent / "data" / "tf1_resize_bilinear.npz")
    for key, size in (("small_up", (23, 31)), ("small_down", (5, 4))):
        got = np.asarray(inception.resize_bilinear_tf1(stored["small_in"], *size))
        np.testing.assert_allclose(got, stored[key], atol=1e-4, rtol=0)  # 0..255 scale
    _load_torch_fidelity_blocks()  # the package stub: torch-fidelity's __init__ imports torchvision
    module = importlib.import_module("torch_fidelity.interpolate_compat_tensorflow")
    pixels = _photos_uint8(64).astype(np.float32)
    want = module.interpolate_bilinear_2d_like_tensorflow1x(
        torch.from_numpy(pixels).permute(0, 3, 1, 2), size=(299, 299), align_corners=False).permute(0, 2, 3, 1)
    np.testing.assert_allclose(np.asarray(inception.resize_bilinear_tf1(pixels, 299, 299)), want.numpy(),
                               atol=1e-4, rtol=0)
    # pytorch-fid's resize (half-pixel centres) is another image: about a pixel level off on average.
    torch_rule = np.asarray(inception.resize_bilinear(pixels, 299, 299))
    assert np.abs(torch_rule - want.numpy()).mean() > 0.5

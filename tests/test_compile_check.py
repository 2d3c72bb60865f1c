"""The TPU compile check: its HLO and error readers (exact, on hand-written text), and, marked slow,
real compiles of a tiny model for a v5e:2x2 slice with the xla and splash attention backends."""

import ast
import json
import os
import pathlib
import re
import subprocess
import sys
import textwrap

import pytest

from lapflow_jax import compile_check

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Shaped like the TPU compiler's optimized HLO: an async all-gather in the entry, a while loop of
# 12 trips whose body holds a sync all-reduce (2 arrays) and an async one reached through a
# fusion-like call, and a reduce-scatter in the loop's condition (runs once per call here); then
# a scan's loop without a known_trip_count, bounded by `i < 3` in its condition (as libtpu 0.0.42
# writes the layer scan); and an adaptive loop (diffrax's dopri5: `k < max_steps and not done`),
# whose trip count depends on the data.
HLO = textwrap.dedent("""\
    HloModule jit_step, entry_computation_layout={(f32[8,128]{1,0})->f32[8,128]{1,0}}

    %add (x: f32[], y: f32[]) -> f32[] {
      %x = f32[] parameter(0)
      %y = f32[] parameter(1)
      ROOT %sum = f32[] add(f32[] %x, f32[] %y)
    }

    %inner (p: bf16[4,256]) -> bf16[4,256] {
      %p = bf16[4,256]{1,0:T(8,128)(2,1)} parameter(0)
      %ars = bf16[4,256]{1,0} all-reduce-start(bf16[4,256]{1,0} %p), replica_groups={{0,1}}, to_apply=%add
      ROOT %ard = bf16[4,256]{1,0:T(8,128)(2,1)} all-reduce-done(bf16[4,256]{1,0} %ars)
    }

    %body (t: (s32[], f32[8,128])) -> (s32[], f32[8,128]) {
      %t = (s32[], f32[8,128]{1,0}) parameter(0)
      %g = f32[8,128]{1,0} get-tuple-element((s32[], f32[8,128]{1,0}) %t), index=1
      %ar = (f32[8,128]{1,0}, f32[16]{0}) all-reduce(f32[8,128]{1,0} %g, f32[16]{0} %g), to_apply=%add
      %c = bf16[4,256]{1,0} call(bf16[4,256]{1,0} %g), to_apply=%inner
      ROOT %r = (s32[], f32[8,128]{1,0}) tuple(s32[] %i, f32[8,128]{1,0} %g)
    }

    %cond (t: (s32[], f32[8,128])) -> pred[] {
      %t = (s32[], f32[8,128]{1,0}) parameter(0)
      %rs = f32[2,128]{1,0} reduce-scatter(f32[8,128]{1,0} %g), dimensions={0}, to_apply=%add
      ROOT %lt = pred[] compare(s32[] %i, s32[] %n), direction=LT
    }

    %scan_cond (u: (s32[], f32[8,128])) -> pred[] {
      %three = s32[]{:T(128)} constant(3)
      %i = s32[] get-tuple-element((s32[], f32[8,128]{1,0}) %u), index=0
      ROOT %lt = pred[]{:T(512)} compare(%i, %three), direction=LT
    }

    %scan_body (u: (s32[], f32[8,128])) -> (s32[], f32[8,128]) {
      %u = (s32[], f32[8,128]{1,0}) parameter(0)
      %cp = f32[8,128]{1,0} collective-permute(f32[8,128]{1,0} %g), source_target_pairs={{0,1},{1,0}}
      ROOT %r = (s32[], f32[8,128]{1,0}) tuple(s32[] %i, f32[8,128]{1,0} %cp)
    }

    %adaptive_cond (v: (s32[], f32[8,128])) -> pred[] {
      %max_steps = s32[] constant(100000)
      %k = s32[] get-tuple-element((s32[], f32[8,128]{1,0}) %v), index=0
      %below = pred[] compare(%k, %max_steps), direction=LT
      %done = pred[] get-tuple-element((s32[], f32[8,128]{1,0}) %v), index=2
      %running = pred[] not(%done)
      ROOT %go = pred[] and(%below, %running)
    }

    %adaptive_body (v: (s32[], f32[8,128])) -> (s32[], f32[8,128]) {
      %v = (s32[], f32[8,128]{1,0}) parameter(0)
      %a2a = f32[8,128]{1,0} all-to-all(f32[8,128]{1,0} %g), dimensions={0}
      ROOT %r = (s32[], f32[8,128]{1,0}) tuple(s32[] %k, f32[8,128]{1,0} %a2a)
    }

    ENTRY %main.42 (a: f32[8,128]) -> f32[8,128] {
      %a = f32[8,128]{1,0} parameter(0)
      %ags = (f32[2,128]{1,0}, f32[8,128]{1,0}) all-gather-start(f32[2,128]{1,0} %a), dimensions={0}
      %agd = f32[8,128]{1,0} all-gather-done((f32[2,128]{1,0}, f32[8,128]{1,0}) %ags)
      %w = (s32[], f32[8,128]{1,0}) while((s32[], f32[8,128]{1,0}) %init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"12"}}
      %s = (s32[], f32[8,128]{1,0}) while((s32[], f32[8,128]{1,0}) %w), condition=%scan_cond, body=%scan_body
      %d = (s32[], f32[8,128]{1,0}) while((s32[], f32[8,128]{1,0}) %s), condition=%adaptive_cond, body=%adaptive_body
      ROOT %out = f32[8,128]{1,0} get-tuple-element((s32[], f32[8,128]{1,0}) %d), index=1
    }
    """)


def test_collectives_count_loops_by_trip_count_and_async_pairs_once():
    found = {c.kind: (c.count, c.bytes) for c in compile_check.collectives(HLO)}
    assert found == {
        "all-gather": (1, 8 * 128 * 4),                       # the -done's result; the -start not again
        "all-reduce": (12 + 12, 12 * (8 * 128 * 4 + 16 * 4) + 12 * (4 * 256 * 2)),  # sync tuple + async bf16
        "reduce-scatter": (1, 2 * 128 * 4),                   # in the condition: not multiplied
        "collective-permute": (3, 3 * 8 * 128 * 4),            # a scan's loop: `i < 3` bounds it
        "all-to-all": (1, 8 * 128 * 4),                       # an adaptive loop (dopri5): once, not 1e5
    }


def test_shape_bytes_sums_tuples_and_ignores_layouts():
    assert compile_check.shape_bytes("(f32[8,128]{1,0:T(8,128)}, bf16[4]{0}, s32[])") == 8 * 128 * 4 + 4 * 2 + 4


def test_out_of_memory_reads_the_compilers_figures():
    error = RuntimeError("RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory "
                         "space hbm. Used 21.95G of 15.48G hbm. Exceeded hbm capacity by 6.47G.")
    needed, usable = compile_check.out_of_memory(error)
    assert needed == pytest.approx(21.95 * 2 ** 30) and usable == pytest.approx(15.48 * 2 ** 30)
    # The wording of libtpu 0.0.42: temporaries only, so the arguments are added.
    error = RuntimeError("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
                         "temporaries (80.38G) exceeds available HBM (15.75G).")
    needed, usable = compile_check.out_of_memory(error, argument_bytes=2 ** 20)
    assert needed == pytest.approx(80.38 * 2 ** 30 + 2 ** 20) and usable == pytest.approx(15.75 * 2 ** 30)
    assert compile_check.out_of_memory(RuntimeError("INTERNAL: something else")) is None


def test_unknown_topology_names_the_flag():
    pytest.importorskip("libtpu", reason="the TPU compiler comes with the test extras (jax[tpu])")
    with pytest.raises(ValueError, match=r"--topology='v9z:1x1'.*v5p:4x4x4"):
        compile_check.topology_devices("v9z:1x1")


TINY_CONFIG = textwrap.dedent("""\
    from lapflow_jax.config import base_config

    def get_config():
        c = base_config()
        c.data.name = "digits"
        c.data.image_size = 32
        c.model.preset = "tiny"
        c.model.patch_sizes = (4, 4)
        c.model.dtype = "bfloat16"
        c.pyramid.sigmas = (1.0, 1.0)
        c.train.global_batch_size = 32
        c.mesh_shape = (4, 1)
        c.sample.method = "heun"
        c.sample.steps = 4
        c.sample.num_images = 8
        return c
    """)


@pytest.fixture()
def tiny_config(tmp_path):
    path = tmp_path / "tiny_v5e.py"
    path.write_text(TINY_CONFIG)
    return path


def _run(config_path, *flags, tmp_path, topology="v5e:2x2"):
    report = tmp_path / "report.json"
    env = dict(os.environ, PYTHONPATH=REPO)
    proc = subprocess.run([sys.executable, "-m", "lapflow_jax.compile_check", f"--config={config_path}",
                           f"--topology={topology}", f"--json={report}", *flags],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=900)
    return proc, (json.loads(report.read_text()) if report.exists() else None)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["xla", "splash"])
def test_tiny_model_compiles_for_v5e_2x2(tiny_config, tmp_path, backend):
    pytest.importorskip("libtpu", reason="the TPU compiler comes with the test extras (jax[tpu])")
    proc, report = _run(tiny_config, f"--config.model.attention_backend={backend}", tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert report["topology"] == "v5e:2x2" and report["chips"] == 4 and report["device_kind"] == "TPU v5 lite"
    assert report["mesh_shape"] == [4, 1] and report["attention_backend"] == backend and report["fits"]
    names = [p["name"] for p in report["programs"]]
    assert names == ["train step", "sample segment t=0..0.5 (1 scale)", "sample segment t=0.5..1 (2 scales)"]
    step = report["programs"][0]
    assert step["hbm"] == 16 * 2 ** 30 and step["arguments"] > 0 and step["temporaries"] > 0
    assert step["total"] == (step["arguments"] + step["outputs"] - step["aliased"] + step["temporaries"]
                             + step["code"])
    assert step["flops"] > 0 and step["compile_seconds"] > 0
    kinds = {c["kind"]: c for c in step["collectives"]}
    # Data parallel: the gradients are summed over 'data'...
    assert kinds["all-reduce"]["count"] > 0
    # ...and no activation is gathered, with splash (per-device kernel under shard_map) as with XLA.
    assert "all-gather" not in kinds, step["collectives"]
    assert "Fits: every program compiled for v5e:2x2" in proc.stdout


@pytest.mark.slow
def test_oversized_batch_is_reported_as_not_fitting(tiny_config, tmp_path):
    pytest.importorskip("libtpu", reason="the TPU compiler comes with the test extras (jax[tpu])")
    proc, report = _run(tiny_config, "--config.train.global_batch_size=262144", "--nosampling", "--noflops",
                        tmp_path=tmp_path)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    step = report["programs"][0]
    assert not report["fits"] and not step["fits"] and step["total"] > 16 * 2 ** 30
    assert "train step does not fit: it needs" in proc.stderr and "can use of a TPU v5 lite's 16 GiB" in proc.stderr


PAPER_CONFIGS = sorted(p.stem for p in (pathlib.Path(REPO) / "configs").glob("*.py") if p.stem != "demo")
# The paper config CI compiles: a multi-scale one of the smallest model, so the slow job stays short.
CI_PAPER_CONFIG = "imagenet256_b2_lapflow"
_DOC_COMMAND = re.compile(r"python -m lapflow_jax\.compile_check (--config=configs/(\w+)\.py --topology=\S+[^\n]*)")
_DOC_TRAIN_STEP = re.compile(r"train step ([\d.]+) GiB of (\d+)")


def _documented_check(name):
    doc = ast.get_docstring(ast.parse((pathlib.Path(REPO) / "configs" / f"{name}.py").read_text()))
    commands = _DOC_COMMAND.findall(doc)
    assert len(commands) == 1 and commands[0][1] == name, f"configs/{name}.py names no compile check of itself"
    step = _DOC_TRAIN_STEP.search(" ".join(doc.split()))
    assert step, f"configs/{name}.py does not give the check's train-step memory"
    return commands[0][0].split(), float(step.group(1)), float(step.group(2))


@pytest.mark.parametrize("name", PAPER_CONFIGS)
def test_paper_config_docstring_names_a_topology_and_its_memory(name):
    args, gib, hbm = _documented_check(name)
    assert any(a.startswith("--topology=") for a in args) and 0 < gib < hbm


@pytest.mark.slow
@pytest.mark.parametrize("name", PAPER_CONFIGS)
def test_paper_config_passes_the_check_its_docstring_names(name, tmp_path, paper_configs_requested):
    """The docstring's command, run as written: every program fits, and the train step needs the
    memory the docstring states (so the docs follow the code). CI compiles one config (the check
    itself is the same code for all); `pytest --paper-configs -m slow -k paper_config` all ten."""
    pytest.importorskip("libtpu", reason="the TPU compiler comes with the test extras (jax[tpu])")
    if name != CI_PAPER_CONFIG and not paper_configs_requested:
        pytest.skip("compiled with --paper-configs (about 2 min each on 2 cores)")
    args, gib, _ = _documented_check(name)
    report = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, "-m", "lapflow_jax.compile_check", *args, f"--json={report}"],
                          capture_output=True, text=True, cwd=REPO, timeout=1800,
                          env=dict(os.environ, PYTHONPATH=REPO))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    step = json.loads(report.read_text())["programs"][0]
    assert step["total"] / 2 ** 30 == pytest.approx(gib, abs=0.011), "update the docstring's figures"


def test_mesh_axis_that_splits_a_physical_axis():
    """A 'model' axis of 4 on a 16x16 v6e slice is no product of whole physical axes; the mesh
    splits one (jax.make_mesh alone refuses), and every chip appears once."""
    pytest.importorskip("libtpu", reason="the TPU compiler comes with the test extras (jax[tpu])")
    from lapflow_jax import parallel

    devices = compile_check.topology_devices("v6e:16x16")
    mesh = parallel.make_mesh((64, 4), devices)
    assert parallel.mesh_shape(mesh) == (64, 4) and len({d.id for d in mesh.devices.flat}) == 256


FSDP_CONFIG = textwrap.dedent("""\
    from lapflow_jax.config import base_config

    def get_config():
        c = base_config()
        c.data.name = "digits"
        c.data.image_size = 32
        c.num_scales = {scales}
        c.window_starts = {windows}
        c.pyramid.sigmas = (1.0,) * {scales}
        c.model.preset = "tiny"
        c.model.hidden_size = 64
        c.model.num_heads = 2
        c.model.depth = 2
        c.model.patch_sizes = (4,) * {scales}
        c.model.dtype = "bfloat16"
        c.model.scan_layers = True
        c.train.global_batch_size = 16
        c.mesh_shape = (4, 1)
        c.fsdp = True
        return c
    """)


@pytest.mark.slow
def test_fsdp_over_64_chips_gathers(tmp_path):
    """FSDP of a small model over the 64 chips of v5p:4x4x4: in groups of 32 (the default) each
    weight is all-gathered; in one group of 64 the TPU compiler turns every gather into an
    all-reduce of a zero-padded buffer (twice the wire bytes) and no all-gather is left."""
    pytest.importorskip("libtpu", reason="the TPU compiler comes with the test extras (jax[tpu])")
    path = tmp_path / "fsdp64.py"
    path.write_text(FSDP_CONFIG.format(scales=1, windows=(0.0,)).replace("c.mesh_shape = (4, 1)", "c.mesh_shape = (64, 1)")
                    .replace("hidden_size = 64", "hidden_size = 256").replace("global_batch_size = 16",
                                                                              "global_batch_size = 64"))
    kinds = {}
    for group in (0, 64):
        proc, report = _run(path, "--sampling=false", "--flops=false", f"--config.fsdp_group={group}",
                            tmp_path=tmp_path, topology="v5p:4x4x4")
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        kinds[group] = {c["kind"]: c["bytes"] for c in report["programs"][0]["collectives"]}
    assert kinds[0].get("all-gather", 0) > 0 and "all-gather" not in kinds[64], kinds
    # The gathers' bytes moved out of the all-reduces.
    assert kinds[0]["all-reduce"] < 0.6 * kinds[64]["all-reduce"], kinds


@pytest.mark.slow
def test_two_scales_move_each_weight_once(tmp_path):
    """Under FSDP a 2-scale step's collective bytes stay below 2.2x its 1-scale twin's (which has
    half the parameters): all stages share one pass through the model, each per-scale layer runs
    once over every stage's rows (one gradient reduction per weight), and a stage's rows already
    sit on every device (no shuffle). Measured on v5e:2x2: 1.81x (1.48 / 0.82 MB). One model call
    per stage gave 3.2x; one pass with a layer call per (stage, scale) 2.46x, 2.28x with the
    stages' rows interleaved."""
    pytest.importorskip("libtpu", reason="the TPU compiler comes with the test extras (jax[tpu])")
    moved = {}
    for scales, windows in ((1, (0.0,)), (2, (0.5, 0.0))):
        path = tmp_path / f"fsdp{scales}.py"
        path.write_text(FSDP_CONFIG.format(scales=scales, windows=windows))
        proc, report = _run(path, "--sampling=false", "--flops=false", tmp_path=tmp_path)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        moved[scales] = sum(c["bytes"] for c in report["programs"][0]["collectives"])
    assert moved[2] <= 2.2 * moved[1], moved

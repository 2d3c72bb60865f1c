"""The step-time roofline: collective groups read from HLO text in XLA's three spellings, each
collective's wire time on hand-written HLO with a known answer, and the bounds and MFU range."""

import numpy as np
import pytest

from lapflow_jax import compile_check, roofline

V5E, V5P = roofline.CHIPS["TPU v5 lite"], roofline.CHIPS["TPU v5"]


def grid(*shape):
    """Physical coordinates of a slice's chips, x fastest (as libtpu numbers them)."""
    return np.array([c[::-1] for c in np.ndindex(*shape[::-1])])


@pytest.mark.parametrize("text, expected", [
    ("replica_groups={{0,2},{1,3}}", (0, 2)),
    ("replica_groups={}", (0, 1, 2, 3)),
    ("replica_groups=[2,2]<=[4]", (0, 1)),
    ("replica_groups=[2,4]<=[4,2]T(1,0)", (0, 2, 4, 6)),
    ("replica_groups=mesh['axis_0'=4,'axis_1'=2] {'axis_0'}", (0, 2, 4, 6)),
    ("replica_groups=mesh['axis_0'=4,'axis_1'=2] {'axis_1'}", (0, 1)),
    ("replica_groups=mesh['axis_0'=4,'axis_1'=2] {'axis_0','axis_1'}", tuple(range(8))),
    ("source_target_pairs={{0,1},{1,2}}", (0, 1)),
])
def test_replica_group_spellings(text, expected):
    n = 8 if "axis" in text or "T(" in text else 4
    assert compile_check.replica_group(f"x = f32[4] all-reduce(y), {text}", n) == expected


HLO = """\
HloModule step

%sum (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %add = f32[] add(%a, %b)
}

%body (p: (s32[], f32[262144])) -> (s32[], f32[262144]) {
  %p = (s32[], f32[262144]) parameter(0)
  %g = f32[262144] get-tuple-element(%p), index=1
  %ar = f32[262144] all-reduce(%g), replica_groups={{0,1,2,3}}, to_apply=%sum
  %i = s32[] get-tuple-element(%p), index=0
  ROOT %t = (s32[], f32[262144]) tuple(%i, %ar)
}

%cond (p: (s32[], f32[262144])) -> pred[] {
  %p = (s32[], f32[262144]) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %n = s32[] constant(3)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

ENTRY %main (x: bf16[131072], y: f32[262144]) -> f32[262144] {
  %x = bf16[131072] parameter(0)
  %y = f32[262144] parameter(1)
  %ags = (bf16[131072], bf16[524288]) all-gather-start(%x), replica_groups=[1,4]<=[4], dimensions={0}
  %ag = bf16[524288] all-gather-done(%ags)
  %rs = f32[131072] reduce-scatter(%y), replica_groups={{0,1},{2,3}}, dimensions={0}, to_apply=%sum
  %init = (s32[], f32[262144]) tuple(%n0, %y)
  %w = (s32[], f32[262144]) while(%init), condition=%cond, body=%body
  ROOT %out = f32[262144] get-tuple-element(%w), index=1
}
"""

MIB = 2 ** 20


def test_collective_ops_of_hand_written_hlo():
    ops = {op.kind: op for op in compile_check.collective_ops(HLO, num_devices=4)}
    assert ops["all-reduce"] == compile_check.CollectiveOp("all-reduce", 3, MIB, (0, 1, 2, 3))
    assert ops["all-gather"] == compile_check.CollectiveOp("all-gather", 1, MIB, (0, 1, 2, 3))
    assert ops["reduce-scatter"] == compile_check.CollectiveOp("reduce-scatter", 1, MIB // 2, (0, 1))


def test_roofline_of_hand_written_hlo_on_v5e_2x2():
    """v5e 2x2: no wraparound (only a side of 16 wraps). A group over both axes gets one link each
    way on x and on y: 2 x 50 GB/s; a group along x alone, one link: 50 GB/s.

      all-reduce, 1 MiB, 4 chips, 3 times: 3 * 2 * 3/4 * 2^20 B / 100e9 B/s = 47.19 us
      all-gather to 1 MiB, 4 chips:            1 * 3/4 * 2^20 / 100e9 = 7.864 us
      reduce-scatter of 1 MiB (0.5 MiB out) over chips 0, 1 (x only): 1/2 * 2^20 / 50e9 = 10.49 us
    """
    coords = grid(2, 2, 1)
    links = {g: roofline.group_links(V5E, coords[list(g)], (2, 2, 1)) for g in [(0, 1, 2, 3), (0, 1)]}
    assert links[(0, 1, 2, 3)].bandwidth == 100e9 and links[(0, 1)].bandwidth == 50e9
    ops = compile_check.collective_ops(HLO, num_devices=4)
    step = roofline.step_time(V5E, flops=197e9, hbm_bytes=819e6 * 0.5,
                              collectives=[(o.kind, o.count, o.bytes, links[o.group]) for o in ops])
    assert step.collectives["all-reduce"] == pytest.approx(47.185920e-6, rel=1e-6)
    assert step.collectives["all-gather"] == pytest.approx(7.864320e-6, rel=1e-6)
    assert step.collectives["reduce-scatter"] == pytest.approx(10.485760e-6, rel=1e-6)
    # compute 197e9 / 197e12 = 1 ms; HBM 0.5 ms; collectives 65.5 us.
    assert step.compute == pytest.approx(1e-3) and step.hbm == pytest.approx(0.5e-3)
    comm = 47.185920e-6 + 7.864320e-6 + 10.485760e-6
    assert step.lower == pytest.approx(1e-3) and step.upper == pytest.approx(1e-3 + comm)
    assert step.bound_by == "compute"
    assert step.mfu_range == pytest.approx((1e-3 / (1e-3 + comm), 1.0))


def test_torus_links_count_both_ways_only_where_the_group_spans_the_wrapping_axis():
    """v5p: a slice of whole 4x4x4 cubes wraps on every axis. A ring over all 4 chips of x gets
    both directions (2 x 100 GB/s); 2 of them, or any axis of a 2x4x4 slice (no wraparound), one
    direction (100 GB/s). A group over x and y of the cube: 4 directions, 400 GB/s."""
    cube, half = grid(4, 4, 4), grid(2, 4, 4)
    along_x = [0, 1, 2, 3]
    assert roofline.group_links(V5P, cube[along_x], (4, 4, 4)).bandwidth == 200e9
    assert roofline.group_links(V5P, cube[[0, 1]], (4, 4, 4)).bandwidth == 100e9
    assert roofline.group_links(V5P, half[[0, 2, 4, 6]], (2, 4, 4)).bandwidth == 100e9
    assert roofline.group_links(V5P, cube[:16], (4, 4, 4)).bandwidth == 400e9
    assert roofline.group_links(V5P, cube[:16], (4, 4, 4)).describe() == "x4(torus) x y4(torus)"
    # v5e: the pod's full side of 16 wraps, an 8x8 slice does not.
    assert roofline.wraps(V5E, (16, 16, 1), 0) and not roofline.wraps(V5E, (8, 8, 1), 0)


def test_unknown_chip_names_the_kind():
    with pytest.raises(ValueError, match="TPU v9"):
        roofline.chip_for("TPU v9")

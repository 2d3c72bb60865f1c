"""The benchmark scripts run end to end as a user runs them (a subprocess from the repository root),
so that the accelerator run, which nobody can try on the CPU at full size, does not break unseen."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run_script(*args, timeout=900) -> str:
    # One CPU device, as a user's shell has: conftest.py's 8 fake devices would not divide the batches.
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    done = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**env, "JAX_PLATFORMS": "cpu"})
    assert done.returncode == 0, f"{' '.join(args)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def test_attention_benchmark_prints_the_ratio():
    out = run_script("benchmarks/attention.py", "--side=8", "--patch=1", "--batch=1", "--heads=2", "--head_dim=8",
                     "--repeats=1")
    assert "tokens per scale (finest first) [64, 16, 4]" in out
    assert "masked / prefix time ratio:" in out


@pytest.mark.slow
def test_accelerator_benchmark_smoke(tmp_path):
    out = run_script("benchmarks/gpu.py", "--smoke", f"--json={tmp_path / 'result.json'}")
    assert "## B/2" in out and "## XL/2" in out and "MFU" in out
    result = json.loads((tmp_path / "result.json").read_text())
    assert set(result["results"]) == {"B", "XL"}
    for preset, settings in (("B", {"baseline", "lapflow2", "lapflow3"}), ("XL", {"baseline", "lapflow2"})):
        sampling, training = result["results"][preset]["sampling"], result["results"][preset]["training"]
        assert set(sampling) == set(training) == settings
        for name in settings - {"baseline"}:
            # FLOPs follow the token arithmetic (the tiny model's per-call constant pulls them below).
            for r in (sampling[name], training[name]):
                assert 0.8 * r["token_ratio"] < r["flops_ratio"] <= r["token_ratio"] * 1.02, (preset, name, r)
        for r in training.values():
            assert r["seconds_per_step"] > 0 and r["tflops_per_s_per_device"] > 0 and 0 < r["mfu"] < 1

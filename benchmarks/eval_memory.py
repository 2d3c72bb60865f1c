"""Peak host RAM of the eval mode against the number of samples: it must not grow with N.

The eval mode streams (lapflow_jax/evaluation/streaming.py): each batch's features go to part
files and the statistics are accumulated from them, so host memory holds a few batches and a
part whatever N is. This script writes a samples .npz of N images (photo crops and noise, uint8,
written row by row so the script itself stays small), runs

    python -m lapflow_jax.main --config=configs/demo.py --workdir=<dir> --mode=eval \
        --config.eval.samples_npz=<samples> --config.eval.reference_npz=<reference> \
        --config.eval.metrics=<metrics>

in a fresh process for each N, and reads that process's peak resident set (os.wait4's ru_maxrss)
and its wall time. It prints one row per N and the growth of the peak from the smallest N.

    python benchmarks/eval_memory.py --sizes 2000 8000 --image_size 128

A benchmark, not a test: the pass mark (growth < 15% from 2,000 to 8,000 at 128 px) is read
from its output.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def photo_rows(count: int, size: int, seed: int):
    """`count` uint8 images [size, size, 3] in chunks: random crops of scikit-image's photos, half
    with noise added (so the features vary)."""
    from PIL import Image
    from skimage import data

    photos = [data.astronaut(), data.chelsea(), data.coffee(), data.rocket()]
    rng = np.random.default_rng(seed)
    for start in range(0, count, 256):
        rows = []
        for _ in range(min(256, count - start)):
            photo = photos[rng.integers(len(photos))]
            side = int(rng.integers(64, min(photo.shape[:2])))
            y, x = (int(rng.integers(0, photo.shape[i] - side + 1)) for i in (0, 1))
            crop = np.asarray(Image.fromarray(photo[y:y + side, x:x + side]).resize((size, size), Image.BILINEAR))
            if rng.random() < 0.5:
                crop = np.clip(crop + rng.normal(0, 20, crop.shape), 0, 255).astype(np.uint8)
            rows.append(crop)
        yield np.stack(rows)


def write_images(path: Path, count: int, size: int, seed: int) -> None:
    from lapflow_jax.evaluation import npz

    writer = npz.NpzWriter(path, {"arr_0": ((count, size, size, 3), np.uint8)})
    for rows in photo_rows(count, size, seed):
        writer.write("arr_0", rows)
    writer.close()


def run_eval(workdir: Path, samples: Path, reference: Path, metrics: str, env: dict) -> tuple[int, float, str]:
    """(peak RSS in bytes, wall seconds, stderr tail) of one eval-mode process."""
    cmd = [sys.executable, "-m", "lapflow_jax.main", f"--config={REPO / 'configs' / 'demo.py'}",
           f"--workdir={workdir}", "--mode=eval", f"--config.eval.samples_npz={samples}",
           f"--config.eval.reference_npz={reference}", f"--config.eval.metrics={metrics}"]
    start = time.perf_counter()
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        tail = err.read().decode(errors="replace")[-3000:]
    if proc.returncode:
        raise RuntimeError(f"eval failed (exit {proc.returncode}):\n{tail}")
    return usage.ru_maxrss * 1024, time.perf_counter() - start, tail


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2000, 8000], help="numbers of samples N")
    parser.add_argument("--image_size", type=int, default=128)
    parser.add_argument("--num_reference", type=int, default=500)
    parser.add_argument("--metrics", default="('fd_efficientnet',)",
                        help="config.eval.metrics (fd_efficientnet needs no weight file)")
    parser.add_argument("--workdir", default="", help="keep the files here (default: a temporary folder)")
    args = parser.parse_args()

    root = Path(args.workdir or tempfile.mkdtemp(prefix="eval_memory_"))
    root.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}
    reference = root / "reference.npz"
    if not reference.exists():
        write_images(reference, args.num_reference, args.image_size, seed=1)
    rows = []
    for n in args.sizes:
        samples = root / f"samples_{n}.npz"
        if not samples.exists():
            write_images(samples, n, args.image_size, seed=2)
        peak, seconds, _ = run_eval(root / f"work_{n}", samples, reference, args.metrics, env)
        rows.append((n, peak, seconds))
        print(f"N={n}: peak RSS {peak / 2**20:.0f} MiB, {seconds:.0f} s", flush=True)
    base = rows[0][1]
    print(f"\n{args.image_size} px, metrics {args.metrics}, {args.num_reference} reference images")
    print("| N | peak host RSS (MiB) | growth from N={} | wall (s) |".format(rows[0][0]))
    print("|---|---|---|---|")
    for n, peak, seconds in rows:
        print(f"| {n} | {peak / 2**20:.0f} | {100 * (peak / base - 1):+.1f}% | {seconds:.0f} |")


if __name__ == "__main__":
    main()

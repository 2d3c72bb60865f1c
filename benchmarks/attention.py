"""Block-causal attention: per-scale prefix form vs one masked attention, same run, same inputs.

    python benchmarks/attention.py                        # CPU: B/2-like heads at the paper's latent size
    python benchmarks/attention.py --scales=3 --batch=8 --backends=xla,masked,splash   # on TPU

Prints time per call (forward + backward) for each backend and the masked/prefix ratio. The
prefix form does no work on masked-out (fine -> coarse) pairs; the masked form computes them all.
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from lapflow_jax.models import attention


def tokens_per_scale(side: int, patch: int, scales: int) -> list[int]:
    """Tokens of each scale, finest first, for a side x side input and one patch size."""
    return [((side >> k) // patch) ** 2 for k in range(scales)]


def time_backend(backend, qs, ks, vs, repeats):
    def loss(q, k, v):
        return sum(jnp.sum(o.astype(jnp.float32) ** 2) for o in attention.block_causal_attention(q, k, v, backend))

    fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
    jax.block_until_ready(fn(qs, ks, vs))  # compile
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(qs, ks, vs))
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--side", type=int, default=32, help="finest input side (32 = 256 px latent)")
    parser.add_argument("--patch", type=int, default=2)
    parser.add_argument("--scales", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--head_dim", type=int, default=64)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--backends", default="xla,masked")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    lengths = tokens_per_scale(args.side, args.patch, args.scales)
    keys = iter(jax.random.split(jax.random.key(0), 3 * len(lengths)))
    make = lambda: [jax.random.normal(next(keys), (args.batch, n, args.heads, args.head_dim), jnp.dtype(args.dtype))
                    for n in lengths]
    qs, ks, vs = make(), make(), make()
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), tokens per scale (finest first) "
          f"{lengths}, batch {args.batch}, {args.heads} heads x {args.head_dim}, {args.dtype}")
    results = {b: time_backend(b, qs, ks, vs, args.repeats) for b in args.backends.split(",")}
    for backend, seconds in results.items():
        print(f"  {backend:8s} {seconds * 1e3:9.2f} ms per forward+backward")
    if "xla" in results and "masked" in results:
        print(f"masked / prefix time ratio: {results['masked'] / results['xla']:.2f}x")


if __name__ == "__main__":
    main()

"""Training-mode BatchNorm on the CPU: flax's, jkd's (sums as ``ones @ x``) and torch's.

Times, in one process and interleaved, the per-channel sum of one activation (``jnp.sum`` over
the major axes, as flax's BatchNorm does, against ``ones @ x``) and BatchNorm's forward +
backward, for the largest activation of resnet8x4 at batch 64. ``ratio`` is flax's time over jkd's (higher is better).

    .venv/bin/python benchmarks/batchnorm.py
"""

from __future__ import annotations

import statistics

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from common import seconds_per_call
from jkd.models.batchnorm import BatchNorm, channel_sum

SHAPE = (64, 32, 32, 64)


def _train_fwd_bwd(cls, x, g):
    bn = cls(SHAPE[-1], rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(bn)

    def forward(x, state):
        m = nnx.merge(graphdef, state)
        m.train()
        return m(x), nnx.state(m)

    def f(x, g, state):  # g an argument: a closed-over array would be folded in as a constant
        _, vjp, new_state = jax.vjp(forward, x, state, has_aux=True)
        return vjp(g), new_state  # gradients w.r.t. the input and the scale and bias

    fn = jax.jit(f)
    return lambda: jax.block_until_ready(fn(x, g, state))


def run(rounds: int = 7, calls: int = 10) -> dict:
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal(SHAPE), jnp.float32)
    g = jnp.asarray(rng.standard_normal(SHAPE), jnp.float32)
    x2 = x.reshape(-1, SHAPE[-1])
    sum_4d, sum_2d = jax.jit(lambda a: jnp.sum(a, axis=(0, 1, 2))), jax.jit(lambda a: jnp.sum(a, axis=0))
    dot_sum = jax.jit(channel_sum)
    cases = {  # flax's reduction (4-D, over N, H, W), the same on the [N*H*W, C] view, ones @ x
        "reduce_sum_4d": lambda: jax.block_until_ready(sum_4d(x)),
        "reduce_sum_2d": lambda: jax.block_until_ready(sum_2d(x2)),
        "ones_dot_sum": lambda: jax.block_until_ready(dot_sum(x2)),
        "flax_batchnorm": _train_fwd_bwd(nnx.BatchNorm, x, g),
        "jkd_batchnorm": _train_fwd_bwd(BatchNorm, x, g),
    }
    try:
        import torch

        bn = torch.nn.BatchNorm2d(SHAPE[-1]).train()
        xt = torch.from_numpy(np.array(x)).permute(0, 3, 1, 2).contiguous().requires_grad_(True)
        gt = torch.from_numpy(np.array(g)).permute(0, 3, 1, 2).contiguous()
        cases["torch_batchnorm"] = lambda: torch.autograd.grad(bn(xt), xt, gt)
    except ImportError:  # torch is in the `bench` extra
        pass
    for fn in cases.values():
        fn()
    times = {k: [] for k in cases}
    for _ in range(rounds):
        for k, fn in cases.items():
            times[k].append(seconds_per_call(fn, calls))
    ms = {k: 1000 * statistics.median(v) for k, v in times.items()}
    return {
        "shape": list(SHAPE),
        "ms": ms,
        "ratio": ms["flax_batchnorm"] / ms["jkd_batchnorm"],
        "sum_ratio": ms["reduce_sum_4d"] / ms["ones_dot_sum"],
    }


if __name__ == "__main__":
    from common import write

    r = run()
    write("batchnorm", r)
    timings = ", ".join(f"{k} {v:.2f} ms" for k, v in r["ms"].items())
    print(
        f"BatchNorm train forward+backward {tuple(r['shape'])}: {timings}; flax / jkd "
        f"{r['ratio']:.2f}, 4-D sum / dot {r['sum_ratio']:.1f}"
    )

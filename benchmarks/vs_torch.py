"""jkd's distillation step against the same step written plainly in PyTorch eager (CPU).

Same architectures, batch, loss (soft KD, T=4, 0.9 KD + 0.1 CE), optimizer (SGD, momentum 0.9,
weight decay 5e-4), input (uint8 NHWC images, normalised inside the step); the teacher runs in
eval mode without gradients. Timed side by side in one process, interleaved in rounds; figures
are medians over rounds and ratios (jkd over PyTorch; higher is better). ``ratio`` waits for
every step's loss; ``ratio_pipelined`` dispatches the steps back to back and waits once, as jkd's
fit loop does between its ``sync_every`` synchronisations.

    .venv/bin/pip install -e '.[bench]'      # torch==2.13.0, the CPU build
    .venv/bin/python benchmarks/vs_torch.py [mlp|cnn ...] [--batch N]   # N: another batch size
"""

from __future__ import annotations

import functools
import statistics

import jax
import jax.numpy as jnp
import numpy as np

from common import seconds_per_call
from jkd.data import augment
from jkd.models import create_model, model_stats
from jkd.train import SGDConfig, create_train_state, freeze_model, make_optimizer, objectives, parallel, train_step
from jkd.train.steps import teacher_logits

PAIRS = {  # name: teacher, student, image shape, batch
    "mlp": ("mlp_2x1200", "mlp_2x800", (28, 28, 1), 256),
    "cnn": ("resnet32x4", "resnet8x4", (32, 32, 3), 64),
}
T, KD_WEIGHT, CE_WEIGHT, LR, MOMENTUM, WD = 4.0, 0.9, 0.1, 0.05, 0.9, 5e-4
MEAN, STD = 0.5, 0.25


def matmul_peak(n: int = 2048, repeats: int = 10) -> dict:
    """The best float32 matmul rate of this machine, in JAX and in torch (GFLOP/s)."""
    import torch

    a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n)), jnp.float32)
    mm = jax.jit(jnp.dot)
    jax.block_until_ready(mm(a, a))
    t_jax = min(seconds_per_call(lambda: jax.block_until_ready(mm(a, a)), 1) for _ in range(repeats))
    ta = torch.from_numpy(np.array(a))  # a writable copy
    torch.mm(ta, ta)
    t_torch = min(seconds_per_call(lambda: torch.mm(ta, ta), 1) for _ in range(repeats))
    flops = 2 * n**3
    return {
        "jax_gflops": flops / t_jax / 1e9,
        "torch_gflops": flops / t_torch / 1e9,
        "peak_gflops": max(flops / t_jax, flops / t_torch) / 1e9,
    }


# ---- jkd -------------------------------------------------------------------------------------------
def jkd_pair(pair: str, batch: int, seed: int = 0):
    t_name, s_name, shape, _ = PAIRS[pair]
    tg, teacher = freeze_model(create_model(t_name, num_classes=10, input_shape=shape, seed=seed + 1))
    tx = make_optimizer(
        SGDConfig(learning_rate=LR, momentum=MOMENTUM, weight_decay=WD, decay_epochs=()),
        steps_per_epoch=100,
        total_steps=10_000,
    )
    sg, state = create_train_state(create_model(s_name, num_classes=10, input_shape=shape, seed=seed), tx, seed=seed)
    view = lambda key, images: augment.normalize(images, (MEAN,) * shape[-1], (STD,) * shape[-1])  # noqa: E731
    step = parallel.single_device(functools.partial(train_step, graphdef=sg, tx=tx, view_fn=view, teacher_graphdef=tg))
    objective = objectives.SoftKD(temperature=T, kd_weight=KD_WEIGHT, ce_weight=CE_WEIGHT)
    rng = np.random.default_rng(seed)
    b = {
        "image": rng.integers(0, 256, (batch, *shape), dtype=np.uint8),
        "label": rng.integers(0, 10, batch).astype(np.int32),
    }
    box = {"state": state}

    def one_step(sync: bool = True):
        box["state"], metrics = step(box["state"], b, objective, teacher)
        if sync:
            jax.block_until_ready(metrics["loss"])
        return metrics

    forward = jax.jit(lambda t, images: teacher_logits(tg, t, view(None, images)))
    teacher_forward = lambda: jax.block_until_ready(forward(teacher, b["image"]))  # noqa: E731
    one_step(), teacher_forward()  # compile
    flops = {
        "teacher_forward": model_stats(create_model(t_name, num_classes=10, input_shape=shape, seed=0), shape).flops,
        "student_forward": model_stats(create_model(s_name, num_classes=10, input_shape=shape, seed=0), shape).flops,
    }
    return one_step, teacher_forward, flops


# ---- PyTorch eager -----------------------------------------------------------------------------------
def torch_pair(pair: str, batch: int, seed: int = 0):
    import torch
    from torch import nn
    import torch.nn.functional as F

    torch.manual_seed(seed)
    t_name, s_name, shape, _ = PAIRS[pair]

    def mlp(hidden):
        layers, cin = [nn.Flatten()], int(np.prod(shape))
        for h in hidden:
            layers += [nn.Linear(cin, h), nn.ReLU()]
            cin = h
        return nn.Sequential(*layers, nn.Linear(cin, 10))

    class Block(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.short = (
                nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                if stride != 1 or cin != cout
                else nn.Identity()
            )

        def forward(self, x):
            y = F.relu(self.bn1(self.conv1(x)))
            return F.relu(self.bn2(self.conv2(y)) + self.short(x))

    class ResNet(nn.Module):  # CRD's CIFAR ResNet, the x4 widths
        def __init__(self, depth, widths=(32, 64, 128, 256)):
            super().__init__()
            n = (depth - 2) // 6
            self.stem = nn.Sequential(
                nn.Conv2d(shape[-1], widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU()
            )
            blocks, cin = [], widths[0]
            for s, cout in enumerate(widths[1:]):
                for i in range(n):
                    blocks.append(Block(cin, cout, 2 if (s > 0 and i == 0) else 1))
                    cin = cout
            self.blocks = nn.Sequential(*blocks)
            self.head = nn.Linear(cin, 10)

        def forward(self, x):
            return self.head(self.blocks(self.stem(x)).mean(dim=(2, 3)))

    build = {
        "mlp_2x1200": lambda: mlp((1200, 1200)),
        "mlp_2x800": lambda: mlp((800, 800)),
        "resnet32x4": lambda: ResNet(32),
        "resnet8x4": lambda: ResNet(8),
    }
    teacher, student = build[t_name]().eval(), build[s_name]().train()
    opt = torch.optim.SGD(student.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WD)
    rng = np.random.default_rng(seed)
    images = torch.from_numpy(rng.integers(0, 256, (batch, *shape), dtype=np.uint8))
    labels = torch.from_numpy(rng.integers(0, 10, batch))

    def view(x):
        return ((x.float() / 255.0 - MEAN) / STD).permute(0, 3, 1, 2).contiguous()

    def one_step(sync: bool = True):
        x = view(images)
        with torch.no_grad():
            t_logits = teacher(x)
        s_logits = student(x)
        kd = (
            F.kl_div(
                F.log_softmax(s_logits / T, -1), F.log_softmax(t_logits / T, -1), reduction="batchmean", log_target=True
            )
            * T
            * T
        )
        loss = KD_WEIGHT * kd + CE_WEIGHT * F.cross_entropy(s_logits, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.item() if sync else loss

    def teacher_forward():
        with torch.no_grad():
            return teacher(view(images))[0, 0].item()

    one_step(), teacher_forward()
    return one_step, teacher_forward


def back_to_back(one_step, n: int) -> None:
    """``n`` steps with one wait at the end, as jkd's fit loop runs them: JAX dispatches the
    next step while the last computes; eager CPU torch runs each op as it is called anyway."""
    for _ in range(n - 1):
        one_step(sync=False)
    one_step()


def run(pair: str, rounds: int = 7, steps: int = 5, batch: int | None = None) -> dict:
    import torch

    t_name, s_name, shape, default_batch = PAIRS[pair]
    batch = batch or default_batch
    j_step, j_teacher, flops = jkd_pair(pair, batch)
    p_step, p_teacher = torch_pair(pair, batch)
    times = {
        k: [] for k in ("jkd_step", "torch_step", "jkd_pipelined", "torch_pipelined", "jkd_teacher", "torch_teacher")
    }
    for _ in range(rounds):  # interleaved: machine noise hits both
        times["jkd_step"].append(seconds_per_call(j_step, steps))  # waits for every step's loss
        times["torch_step"].append(seconds_per_call(p_step, steps))
        times["jkd_pipelined"].append(seconds_per_call(lambda: back_to_back(j_step, steps)) / steps)
        times["torch_pipelined"].append(seconds_per_call(lambda: back_to_back(p_step, steps)) / steps)
        times["jkd_teacher"].append(seconds_per_call(j_teacher, steps))
        times["torch_teacher"].append(seconds_per_call(p_teacher, steps))
    med = {k: statistics.median(v) for k, v in times.items()}
    peak = matmul_peak()
    # Model FLOPs of one step: teacher forward + student forward and backward (~3x forward).
    step_flops = batch * (flops["teacher_forward"] + 3 * flops["student_forward"])
    return {
        "pair": f"{t_name} -> {s_name}",
        "batch": batch,
        "torch": torch.__version__,
        "jax": jax.__version__,
        "threads": {"torch": torch.get_num_threads()},
        "jkd_images_per_s": batch / med["jkd_step"],
        "comparison_images_per_s": batch / med["torch_step"],
        "ratio": med["torch_step"] / med["jkd_step"],
        # Steps dispatched back to back with one wait at the end, as jkd's fit loop runs them
        # (sync_every): JAX's dispatch and input transfer overlap the previous step's compute.
        "ratio_pipelined": med["torch_pipelined"] / med["jkd_pipelined"],
        "jkd_gflops": step_flops / med["jkd_step"] / 1e9,
        "torch_gflops": step_flops / med["torch_step"] / 1e9,
        "matmul_peak_gflops": peak["peak_gflops"],
        "matmul": peak,
        "jkd_fraction_of_peak": step_flops / med["jkd_step"] / 1e9 / peak["peak_gflops"],
        "jkd_teacher_share": med["jkd_teacher"] / med["jkd_step"],
        "torch_teacher_share": med["torch_teacher"] / med["torch_step"],
        "step_ms": {k: 1000 * v for k, v in med.items()},
    }


if __name__ == "__main__":
    import argparse

    from common import write

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pairs", nargs="*", metavar="|".join(PAIRS), help="the pairs to time (default: all)")
    parser.add_argument("--batch", type=int, default=None, help="batch size (default: the pair's)")
    args = parser.parse_args()
    if unknown := set(args.pairs) - set(PAIRS):
        parser.error(f"unknown pair(s) {sorted(unknown)}; expected some of {list(PAIRS)}")
    for pair in args.pairs or list(PAIRS):
        r = run(pair, batch=args.batch)
        write(f"vs_torch_{pair}" + (f"_batch{args.batch}" if args.batch else ""), r)
        print(
            f"{r['pair']} (batch {r['batch']}): jkd {r['jkd_images_per_s']:.0f} img/s, torch "
            f"{r['comparison_images_per_s']:.0f} img/s, ratio {r['ratio']:.2f} (pipelined "
            f"{r['ratio_pipelined']:.2f}); jkd {r['jkd_gflops']:.1f} GFLOP/s "
            f"= {100 * r['jkd_fraction_of_peak']:.0f}% of the measured matmul peak {r['matmul_peak_gflops']:.1f}; "
            f"teacher share jkd {r['jkd_teacher_share']:.2f}, torch {r['torch_teacher_share']:.2f}"
        )

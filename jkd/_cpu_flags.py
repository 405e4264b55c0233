"""One XLA CPU setting, applied by ``jkd.initialize()`` before JAX starts its CPU backend.

jaxlib 0.10 lets YNNPACK take over convolutions and element-wise fusions on the CPU; for the
CIFAR ResNets that makes a forward pass ~1.45x slower than XLA's own kernels (resnet32x4,
batch 64, 2 cores: 0.95 s vs 0.65 s; ``benchmarks/vs_torch.py``). Keeping
YNNPACK for dots only (``individual_dot``) restores the convolutions and leaves the MLPs'
matmuls as they were. The flag is added to ``XLA_FLAGS`` only where it is known (jaxlib 0.10
and 0.11), only if the user set no YNNPACK flag of their own, and ``JKD_NO_XLA_FLAGS=1``
turns it off. It affects only the CPU backend, and only a backend started after the import.
"""

from __future__ import annotations

import os

FLAG = "--xla_cpu_experimental_ynn_fusion_type=individual_dot"


def apply() -> bool:
    """Add :data:`FLAG` to ``XLA_FLAGS`` where it is safe; True if it was added."""
    if os.environ.get("JKD_NO_XLA_FLAGS") == "1":
        return False
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_cpu_experimental_ynn_fusion_type" in flags:
        return False  # the user's own choice wins
    try:
        from jaxlib import version
    except ImportError:
        return False
    if not version.__version__.startswith(("0.10.", "0.11.")):
        return False  # an unknown flag aborts XLA; newer releases must be measured first
    os.environ["XLA_FLAGS"] = f"{flags} {FLAG}".strip()
    return True

"""jkd: knowledge distillation in JAX.

Importing jkd changes nothing process-wide. :func:`initialize` applies the settings jkd's
commands run with (the CLI, the benchmarks and the experiments call it); library users may
call it first thing, before JAX starts its CPU backend.
"""

__version__ = "0.2.0"


def initialize(*, xla_cpu_flags: bool = True) -> dict[str, bool]:
    """Apply jkd's process-wide settings; returns which were applied.

    * ``xla_cpu_flags``: one XLA CPU flag that keeps YNNPACK to dot products (1.45x faster CIFAR
      ResNets on jaxlib 0.10, see :mod:`jkd._cpu_flags`), added to ``XLA_FLAGS`` only where
      known and never over a user's own choice. Applied only if JAX's backends have not started
      yet (call this before the first JAX computation); afterwards it changes nothing.
    """
    from jkd import _cpu_flags

    if _backend_started():  # too late: changing XLA_FLAGS now would only mislead child processes
        return {"xla_cpu_flags": False}
    return {"xla_cpu_flags": bool(xla_cpu_flags and _cpu_flags.apply())}


def _backend_started() -> bool:
    import sys

    if "jax" not in sys.modules:
        return False
    try:
        from jax._src import xla_bridge  # no public API tells this (jax 0.10)

        return bool(xla_bridge.backends_are_initialized())
    except (ImportError, AttributeError):
        return False

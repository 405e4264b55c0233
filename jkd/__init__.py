"""jkd: knowledge distillation in JAX."""

from jkd import _cpu_flags

_cpu_flags.apply()  # before JAX starts its CPU backend; see jkd/_cpu_flags.py

__version__ = "0.1.0"

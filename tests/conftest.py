"""Test-wide JAX set-up: 4 CPU devices and strict dtype promotion, before any JAX op."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 4)
# Strict promotion: an accidental f32 x bf16 or int x float mix inside jkd is an error here.
jax.config.update("jax_numpy_dtype_promotion", "strict")

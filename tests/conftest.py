"""Test-wide JAX set-up: 4 CPU devices and strict dtype promotion, before any JAX op."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jkd  # noqa: E402

# The settings jkd's commands run with (one XLA CPU flag: CIFAR convolutions ~1.45x faster), set
# before JAX starts. tests/test_cpu_flags.py runs losses and a train step under JAX's defaults.
jkd.initialize()

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 4)
# Strict promotion: an accidental f32 x bf16 or int x float mix inside jkd is an error here.
jax.config.update("jax_numpy_dtype_promotion", "strict")

import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def _isolated_tfds_dir(tmp_path_factory):
    """Datasets prepared by tests go to a temporary folder, never to ~/tensorflow_datasets."""
    old = os.environ.get("TFDS_DATA_DIR")
    os.environ["TFDS_DATA_DIR"] = str(tmp_path_factory.mktemp("tensorflow_datasets"))
    yield
    if old is None:
        os.environ.pop("TFDS_DATA_DIR", None)
    else:
        os.environ["TFDS_DATA_DIR"] = old

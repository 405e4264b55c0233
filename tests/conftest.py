"""Test-wide JAX set-up: 4 CPU devices and strict dtype promotion, before any JAX op."""

import os
from importlib.metadata import version

os.environ.setdefault("JAX_PLATFORMS", "cpu")

# Compile faster: the suite is mostly XLA compiling tiny models, and LLVM at -O1 without its
# expensive passes plus XLA's older CPU fusion code generator take ~35% off its CPU time (its
# compute-heavy tests got no slower; -O0 made them slower; BUILD_NOTES). Tests check values, not
# speed; benchmarks and jkd's commands keep XLA's defaults. Child processes the tests start
# inherit the flags. A user's own setting of any of them wins. Only on the jaxlib they were
# measured on: XLA aborts on a flag it does not know, and a later release may drop one.
_FAST_COMPILE = (
    "--xla_backend_optimization_level=1",
    "--xla_llvm_disable_expensive_passes=true",
    "--xla_cpu_use_fusion_emitters=false",
)
if version("jaxlib").startswith("0.10."):
    _flags = os.environ.get("XLA_FLAGS", "")
    os.environ["XLA_FLAGS"] = " ".join([_flags, *(f for f in _FAST_COMPILE if f.split("=")[0] not in _flags)]).strip()

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

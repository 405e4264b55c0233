"""jkd's one XLA CPU flag: added only where known, never over a user's own choice."""

import pytest

from jkd import _cpu_flags


@pytest.fixture
def env(monkeypatch):
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    monkeypatch.delenv("JKD_NO_XLA_FLAGS", raising=False)
    return monkeypatch


def _jaxlib(monkeypatch, version):
    import jaxlib.version

    monkeypatch.setattr(jaxlib.version, "__version__", version)


def test_added_on_known_jaxlib_and_kept_with_other_flags(env):
    import os

    _jaxlib(env, "0.10.2")
    env.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
    assert _cpu_flags.apply()
    assert os.environ["XLA_FLAGS"] == f"--xla_force_host_platform_device_count=4 {_cpu_flags.FLAG}"


@pytest.mark.parametrize("setup", ["user_flag", "opt_out", "unknown_jaxlib"])
def test_not_added(env, setup):
    import os

    _jaxlib(env, "0.10.2")
    if setup == "user_flag":
        env.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=")
    elif setup == "opt_out":
        env.setenv("JKD_NO_XLA_FLAGS", "1")
    else:
        _jaxlib(env, "0.14.0")
    before = os.environ.get("XLA_FLAGS")
    assert not _cpu_flags.apply()
    assert os.environ.get("XLA_FLAGS") == before


def _fresh_python(code: str) -> str:
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JKD_NO_XLA_FLAGS")}
    return subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    ).stdout.strip()


def test_importing_jkd_changes_nothing_process_wide():
    code = (
        "import os, sys, jkd, jkd.losses, jkd.train, jkd.jobs.image; "
        "print(os.environ.get('XLA_FLAGS'), 'matplotlib.pyplot' in sys.modules)"
    )
    assert _fresh_python(code) == "None False"


def test_initialize_sets_the_flag_before_jax_starts():
    assert _fresh_python("import os, jkd; print(jkd.initialize(), os.environ['XLA_FLAGS'])") == (
        f"{{'xla_cpu_flags': True}} {_cpu_flags.FLAG}"
    )


def test_initialize_after_jax_started_changes_nothing(env):
    import os

    import jax
    import jkd

    jax.numpy.zeros(1).block_until_ready()  # the backend runs (as in every test process)
    _jaxlib(env, "0.10.2")
    assert jkd.initialize() == {"xla_cpu_flags": False} and "XLA_FLAGS" not in os.environ


_STEP = """
import json, os
import jax
jax.config.update("jax_numpy_dtype_promotion", "strict")
import numpy as np
from jkd import losses
from jkd.train import objectives, parallel
from tests.train import helpers as H

s = np.linspace(-3, 3, 40, dtype=np.float32).reshape(4, 10)
t = np.cos(np.arange(40, dtype=np.float32)).reshape(4, 10)
soft = losses.soft_distillation_loss(s, t, temperature=3.0)
tg, teacher = H.teacher()
g, state = H.student()
step = parallel.single_device(H.step_fn(g, tg, view_fn=H.CROP_FLIP))
state, m = step(state, H.batches(1)[0], objectives.SoftKD(), teacher)
result = {"flags": os.environ.get("XLA_FLAGS"), "soft": np.asarray(soft).tolist(), "loss": float(m["loss"]),
          "kernel": np.asarray(state.params["head"]["kernel"][...]).ravel().tolist()}
"""


def test_losses_and_a_train_step_under_jax_default_flags():
    """The suite runs with jkd.initialize()'s flag; the library must not depend on it: the
    same loss and train step in a process with JAX's defaults give the same numbers."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JKD_NO_XLA_FLAGS")}
    env.update(PYTHONPATH=str(root), JAX_PLATFORMS="cpu")
    default = json.loads(
        subprocess.run(
            [sys.executable, "-c", _STEP + "print(json.dumps(result))"],
            env=env,
            capture_output=True,
            text=True,
            check=True,
            cwd=root,
        )
        .stdout.strip()
        .splitlines()[-1]
    )
    assert default["flags"] is None  # JAX's defaults there
    scope = {}
    exec(_STEP, scope)
    here = scope["result"]
    np = __import__("numpy")
    np.testing.assert_allclose(default["soft"], here["soft"], rtol=1e-6, atol=1e-7)
    assert abs(default["loss"] - here["loss"]) < 1e-6
    np.testing.assert_allclose(default["kernel"], here["kernel"], rtol=1e-5, atol=1e-6)

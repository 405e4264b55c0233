"""`jkd lm demo` on a (2, 2) device mesh of 4 CPU devices: every distilled setting (token KD with
two divergences, sequence-level KD, on-policy distillation, and the labels-only control) ends with
the parameters of the one-device run, the teacher loaded identically in both."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from jkd import cli
from tests.test_lm_experiment import TINY


def _weights(folder):
    from safetensors.numpy import load_file

    return load_file(str(folder / "model.safetensors"))


@pytest.mark.slow
def test_demo_on_a_2x2_mesh_ends_where_one_device_does(tmp_path, capsys):
    assert jax.device_count() == 4
    # Students cut from one teacher layer each (a student that is the whole teacher learns only
    # rounding noise from a KD loss). Adam divides each gradient by its own size plus eps: with
    # optax's eps of 1e-8 a component that is mostly rounding (a rare token's embedding) moves by a
    # step of its sign, on whichever device count rounds it so; eps=1e-4 keeps the comparison one of
    # the computation, not of the rounding of near-zero gradients (docs/guides/design.md, "Numerics").
    tiny = [
        *TINY,
        "--set",
        "students[0].teacher_layers=(1,)",
        "--set",
        "students[1].teacher_layers=(0,)",
        "--set",
        "test_limit=3",
        "--set",
        "student_optimizer.eps=1e-4",
        "--set",
        "pass_k=0",
    ]  # weights compared
    one = tmp_path / "one"
    assert cli.main(["lm", "demo", "--run-dir", str(one), *tiny]) == 0
    mesh = tmp_path / "mesh"
    assert (
        cli.main(
            [
                "lm",
                "demo",
                "--run-dir",
                str(mesh),
                *tiny,
                "--mesh",
                "data=2,model=2",
                "--set",
                f"teacher_dir={one / 'teacher' / 'model'}",
            ]
        )
        == 0
    )
    assert json.loads((mesh / "config.json").read_text())["mesh"] == [2, 2]
    groups = [m["name"] for m in json.loads((one / "summary.json").read_text())["models"][1:]]
    assert len(groups) == 12  # 2 students x (alone, labels, token fkl, token jsd, sequence, on-policy)
    from jkd.runtime.run_folder import slug

    worst = {}
    for name in groups:
        for seed in (0, 1):
            a, b = _weights(one / slug(name) / f"seed{seed}"), _weights(mesh / slug(name) / f"seed{seed}")
            assert sorted(a) == sorted(b)
            worst[name] = max([worst.get(name, 0.0)] + [float(np.abs(a[k].astype(np.float64) - b[k]).max()) for k in a])
    assert max(worst.values()) < 1e-5, worst
    # and they moved: the comparison is not of two untrained copies
    start = _weights(one / "teacher" / "model")
    moved = _weights(one / slug(groups[2]) / "seed0")
    assert float(np.abs(moved["model.norm.weight"] - start["model.norm.weight"]).max()) > 1e-4


def test_mesh_flag_and_config_refuse_what_cannot_run(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:  # the flag's own parser: argparse's usage error
        cli.main(["lm", "demo", "--mesh", "data=two"])
    assert e.value.code == 2 and "expected data=D,model=M" in capsys.readouterr().err
    bad = [
        (["--mesh", "data=2,model=3"], "needs 6 devices; this machine has 4"),
        (
            ["--mesh", "data=4", "--set", "batch_size=6"],
            "steps of 6 rows, which do not split over the mesh's 4 data shards",
        ),
        (["--mesh", "data=2,model=2", "--devices", "2"], "devices=2 (--devices) but the mesh"),
    ]
    for extra, message in bad:
        code = cli.main(["lm", "demo", "--run-dir", str(tmp_path / "run"), "--no-progress", *extra])
        assert code == 2, extra
        assert message in capsys.readouterr().err, extra
        assert not (tmp_path / "run").exists()  # refused before anything is written


def test_the_teacher_answers_on_the_mesh():
    """With a mesh, the requests are answered by the teacher split over it: the same greedy answers."""
    from flax import nnx

    from jkd.jobs.lm import LMExperimentConfig, LMJob
    from jkd.models.decoder import Decoder
    from jkd.models.decoder_config import DecoderConfig
    from jkd.models.sampler import generate

    config = DecoderConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        max_position_embeddings=64,
        eos_token_id=1,
    )
    teacher = Decoder(config, rngs=nnx.Rngs(0))
    nnx.update(teacher, jax.tree.map(lambda x: 8 * x if x.ndim == 2 else x, nnx.state(teacher)))  # peaked
    on_mesh = LMJob(LMExperimentConfig(mesh=(2, 2)))._answering(teacher)
    q = on_mesh.layers[0].self_attn.q_proj.weight[...]
    assert tuple(q.sharding.spec) == ("model", "data") and len(q.addressable_shards) == 4
    assert LMJob(LMExperimentConfig())._answering(teacher) is teacher  # one device: as it is
    prompts = [np.array([5, 9, 3, 7]), np.array([2, 11, 4, 6, 8, 10])]
    want = generate(teacher, prompts, max_new_tokens=6)
    got = generate(on_mesh, prompts, max_new_tokens=6)
    assert [list(r) for r in got.rows()] == [list(r) for r in want.rows()]

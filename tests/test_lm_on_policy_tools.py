"""On-policy distillation through the tools, in the job: the student's own trajectories (its call,
the tool's result, its answer) are what it trains on, and a run resumed from a checkpoint plays the
same trajectories and ends with the same weights."""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest

import jkd.jobs.lm as LX
from jkd.data import toolchat
from jkd.train.lm_steps import OnPolicyKD
from tests.scripted import scripted_generate

pytestmark = pytest.mark.slow


def tiny(**kw) -> LX.LMExperimentConfig:
    cfg = LX.demo_config()
    settings = dict(
        data_sizes=(("train", 64), ("validation", 4), ("test", 6), ("unlabelled", 24)),
        vocab_size=400,
        teacher_steps=2,
        student_steps=4,
        labelled_subset=8,
        batch_size=4,
        pack_length=None,
        seeds=(0, 1),
        max_new_tokens=8,
        max_length=160,
        include_baseline=False,
        teacher=dataclasses.replace(cfg.teacher, hidden_size=32, head_dim=8, intermediate_size=64, num_layers=2),
        students=(LX.LMStudent("s", teacher_layers=(1,)),),
        distillations=(
            LX.LMDistillation("through tools", OnPolicyKD(student_fraction=1.0, max_new_tokens=8), through_tools=True),
        ),
    )
    return dataclasses.replace(cfg, **{**settings, **kw})


def _weights(run_dir):
    from jkd.models.hf import load_hf
    from flax import nnx
    import jax

    out = []
    for seed in (0, 1):
        model = load_hf(run_dir / "s_through_tools" / f"seed{seed}")
        out += [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param))]
    return out


def test_resumed_on_policy_through_tools_plays_the_same_trajectories(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    LX.run(tiny(), a, progress=False)
    shutil.copytree(a, b)
    ckpt = b / "s_through_tools" / "ckpt"
    assert sorted(p.name for p in ckpt.iterdir()) == ["3", "4"]  # the newest two are kept
    shutil.rmtree(ckpt / "4")  # as if killed after step 3's checkpoint
    for saved in (b / "s_through_tools").glob("seed*"):
        shutil.rmtree(saved)
    (b / "summary.json").unlink()
    capsys.readouterr()
    LX.run(tiny(), b, resume=True, progress=False)
    out = capsys.readouterr().out
    assert "s through tools: resumed from the checkpoint of step 3" in out
    for x, y in zip(_weights(a), _weights(b)):
        np.testing.assert_array_equal(x, y)


def test_the_student_learns_its_own_call_the_result_and_its_answer(tmp_path, monkeypatch):
    """The sampler is stood in for by a student that always calls the timer and then answers (a tiny
    random student never calls a tool): its trajectories run through the simulated tools and become
    the rows the step trains on, learned on its two turns only."""
    calls, rows = [], []
    real_tools = toolchat.simulated_tools

    def counting_tools():
        box = real_tools()
        call = box.call
        box.call = lambda name, args: calls.append((name, args)) or call(name, args)
        return box

    fake_generate = scripted_generate(
        lambda text: (
            "Timer set.<|im_end|>"
            if "<|im_start|>tool" in text
            else "<tool_call>\n"
            + json.dumps({"name": "set_timer", "arguments": {"minutes": 5, "label": "tea"}})
            + "\n</tool_call><|im_end|>"
        )
    )

    real_rollout = LX.LMJob._rollout_batch

    def recording(self, state, step, given, **kw):
        fake_generate.tokenizer = self.data.tokenizer
        batch = real_rollout(self, state, step, given, **kw)
        rows.append((self.data.tokenizer, batch, len(calls)))
        return batch

    monkeypatch.setattr(toolchat, "simulated_tools", counting_tools)
    monkeypatch.setattr(LX, "generate", fake_generate)
    monkeypatch.setattr(LX.LMJob, "_rollout_batch", recording)
    LX.run(tiny(student_steps=2, max_turns=2), tmp_path / "run", progress=False)
    assert [n for _, _, n in rows] == [2 * 4, 2 * 2 * 4]  # a step: 2 seeds x 4 requests, one call each
    tok, batch, _ = rows[0]
    for r in range(batch["tokens"].shape[0]):
        ids, learn = batch["tokens"][r, 0], batch["loss_mask"][r, 0]
        whole = tok.decode(ids[batch["attention_mask"][r, 0]])
        learned = tok.decode(ids[learn])
        assert '"ends_at": "09:05"' in whole and '"ends_at"' not in learned  # the result read, never learned
        assert learned.startswith("<tool_call>") and learned.endswith("Timer set.<|im_end|>")

"""A whole language-model distillation run, for the kill-and-resume tests (run as a script).

    python lm_pipeline_script.py MODE RUN_DIR      (MODE: sequence | on_policy)

sequence: the teacher answers 48 prompts (6 cached batches), then the student trains on them;
on_policy: GKD steps with the student sampling inside the step. Both train 8 steps with a
checkpoint every 2 and write the final parameters to RUN_DIR/final.npz.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import jax

jax.config.update("jax_numpy_dtype_promotion", "strict")

import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from jkd.models.decoder import Decoder  # noqa: E402
from jkd.models.decoder_config import DecoderConfig  # noqa: E402
from jkd.train import parallel  # noqa: E402
from jkd.train.checkpoint import Checkpoints  # noqa: E402
from jkd.train.lm_sequence import answer_batches, teacher_answers  # noqa: E402
from jkd.train.lm_steps import OnPolicyKD, TokenKD, on_policy_step, token_kd_step  # noqa: E402
from jkd.train.loop import LoopConfig, fit  # noqa: E402
from jkd.models.sampler import SamplingConfig  # noqa: E402
from jkd.train.state import create_train_state, freeze_model  # noqa: E402

VOCAB = 40
TEACHER = DecoderConfig(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    max_position_embeddings=64,
    eos_token_id=1,
)
STUDENT = DecoderConfig(
    vocab_size=VOCAB,
    hidden_size=16,
    intermediate_size=32,
    num_layers=1,
    num_heads=2,
    num_kv_heads=1,
    max_position_embeddings=64,
    eos_token_id=1,
)


def main(mode: str, run_dir: Path) -> None:
    teacher = Decoder(TEACHER, rngs=nnx.Rngs(1))
    nnx.update(teacher, jax.tree.map(lambda x: x * 10 if x.ndim == 2 else x, nnx.state(teacher)))
    tg, frozen = freeze_model(teacher)
    tx = optax.sgd(0.3)
    g, state = create_train_state(Decoder(STUDENT, rngs=nnx.Rngs(0)), tx, seed=0)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(2, VOCAB, int(n)).tolist() for n in rng.integers(3, 9, 48)]
    if mode == "sequence":
        answers = teacher_answers(
            teacher,
            prompts,
            cache_dir=run_dir / "answers",
            teacher_id="script-teacher",
            max_new_tokens=12,
            batch_size=8,
            progress=True,
            progress_every_s=0.0,
        )
        step = functools.partial(token_kd_step, graphdef=g, teacher_graphdef=tg, tx=tx)
        objective = TokenKD(kd_weight=0.0, ce_weight=1.0, chunk_size=64)

        def batches(start):
            return answer_batches(prompts, answers, batch_size=8, length=24, start=start)
    else:
        step = functools.partial(on_policy_step, graphdef=g, teacher_graphdef=tg, tx=tx)
        objective = OnPolicyKD(
            student_fraction=0.5, max_new_tokens=8, sampling=SamplingConfig(temperature=1.0), chunk_size=64
        )

        def batches(start):
            for b in answer_batches(prompts, [[] for _ in prompts], batch_size=8, length=24, start=start):
                lengths = b["attention_mask"].sum(1).astype(np.int32)
                pt = np.where(np.arange(8)[None] < lengths[:, None], b["tokens"][:, :8], 0)
                # the given completions: the prompt's own last token repeated (any fixed data)
                yield {**b, "loss_mask": b["attention_mask"], "prompt_tokens": pt, "prompt_lengths": lengths}

    run = parallel.single_device(step)

    def log(record):
        if record.get("event") == "resumed":
            print(f"resumed from step {record['step']}", flush=True)
        elif "step" in record:
            print(f"step {record['step']}", flush=True)

    state, _ = fit(
        run,
        state,
        objective,
        frozen,
        batches=batches,
        checkpoints=Checkpoints(run_dir / "ckpt", async_save=False),
        config=LoopConfig(num_steps=8, save_every=2, sync_every=1, progress=False),
        log=log,
    )
    leaves = [np.asarray(x) for x in jax.tree.leaves(state.params)]
    np.savez(run_dir / "final.npz", *leaves)
    print("done", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))

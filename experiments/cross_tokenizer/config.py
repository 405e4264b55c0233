"""Distilling across tokenizers: the fine-tuned SmolLM2-135M-Instruct (49,152 tokens) into a small
student that reads the embedded conversations with their own BPE (1,024 tokens).

Command: `jkd run experiments/cross_tokenizer/config.py --run-dir runs/cross_tokenizer`. Needs the
test extras (`make test` installs them): the teacher is the SmolLM2 folder fine-tuned on the
tool-use conversations by `experiments/smollm2_agent` (its stages 1 and 2, run here into
``runs/smollm2_agent`` when they are not there yet).

The student is a random 4-layer decoder written once as a Hugging Face folder with the BPE that
``jkd lm demo`` learns on the embedded conversations: every setting starts from it. In the report:

- the student alone on the labelled conversations (the control);
- sequence-level KD: the teacher's answers to the unlabelled requests, as text, join the labels;
- the hybrid (GOLD): on the same rows, forward KL over the tokens both vocabularies hold where a
  span is one token with the same string in both, ULD elsewhere, and the labels' cross-entropy;
- ULD on every span, with the same cross-entropy.

The two cross-tokenizer settings read the teacher's span values stored once (its top 1,024 per
span: the student's gradient is the full loss's) instead of running SmolLM2 and sorting its 49,152
probabilities per span at every step (73 s a step here online, for 3 seeds of 8 rows).

The experiment's folder holds the student's start (``student_start/``) and the run (``run/``: the
report, the students, the teacher's answers cached). Override sizes with ``--set``, e.g.
``--set student_steps=20`` for a quick look.
"""

from __future__ import annotations

import dataclasses
import shutil
import sys
from pathlib import Path

from jkd.jobs import lm as LX
from jkd.losses import ForwardKL
from jkd.train import AdamWConfig
from jkd.train.lm_cross import CrossTokenizerKD
from jkd.train.lm_steps import TokenKD

SMOLLM2_RUN = Path("runs/smollm2_agent")


def get_config() -> LX.LMExperimentConfig:
    answers = dict(teacher_answers=True)
    return LX.LMExperimentConfig(
        title="SmolLM2-135M-Instruct (fine-tuned, 49,152 tokens) -> a 4-layer student of the data's own BPE "
        "(1,024 tokens)",
        data_sizes=(("train", 1000), ("test", 100), ("unlabelled", 300)),
        labelled_subset=300,
        max_length=192,
        max_new_tokens=64,
        batch_size=8,
        student_steps=600,
        seeds=(0, 1, 2),
        student_optimizer=AdamWConfig(learning_rate=3e-3, weight_decay=0.0, warmup_steps=20),
        students=(LX.LMStudent("BPE student", from_dir="<built by main>"),),
        distillations=(
            LX.LMDistillation("sequence KD", TokenKD(kd_weight=0.0, ce_weight=1.0), **answers),
            LX.LMDistillation(
                "hybrid fkl", CrossTokenizerKD(ForwardKL(), kd_weight=1.0, ce_weight=1.0, stored=True), **answers
            ),
            LX.LMDistillation("uld", CrossTokenizerKD(None, kd_weight=1.0, ce_weight=1.0, stored=True), **answers),
        ),
    )


def student_folder(out: Path, cfg: LX.LMExperimentConfig, *, hidden: int = 128, layers: int = 4) -> Path:
    """A random decoder with the embedded conversations' BPE (the one ``jkd lm demo`` learns from
    the same data), as a Hugging Face folder (written once)."""
    if (out / "config.json").exists():
        return out
    from flax import nnx

    from jkd.data import conversations as C
    from jkd.data import toolchat
    from jkd.data.chat import render_chat
    from jkd.data.tokenizer import byte_tokenizer, train_bpe_tokenizer
    from jkd.models.decoder import Decoder
    from jkd.models.hf import save_hf

    data = toolchat.write_dataset(out.with_name("student_data"), seed=cfg.data_seed, sizes=dict(cfg.data_sizes))
    plain = byte_tokenizer()
    texts = [render_chat(plain, c["messages"]) for c in C.read_conversations(data["train"])]
    tok = train_bpe_tokenizer(texts, vocab_size=1024)
    config = dataclasses.replace(
        LX._decoder(tok.vocab_size, hidden, layers),
        max_position_embeddings=512,
        eos_token_id=tok.eos_id,
        pad_token_id=tok.pad_id,
    )
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    save_hf(Decoder(config, rngs=nnx.Rngs(0)), tmp, tokenizer=tok)
    tmp.rename(out)
    return out


def main(
    cfg: LX.LMExperimentConfig, run_dir: str, *, resume: bool = False, force: bool = False, progress: bool = True
) -> None:
    root = Path(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    teacher = cfg.teacher_dir
    if teacher is None:
        sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
        from experiments.smollm2_agent.config import fine_tuned_teacher

        teacher = fine_tuned_teacher(SMOLLM2_RUN, progress=progress)
    student = student_folder(root / "student_start", cfg)
    cfg = dataclasses.replace(
        cfg,
        teacher_dir=str(teacher),
        students=tuple(dataclasses.replace(s, from_dir=str(student)) for s in cfg.students),
    )
    LX.run(cfg, root / "run", resume=resume, force=force, progress=progress)

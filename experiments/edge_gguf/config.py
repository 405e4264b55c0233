"""The agent demo's 2-layer student at the edge: distilled in float32 and then quantized (PTQ), or
distilled with its weights as a q4_0 GGUF file holds them (quantization-aware distillation, QAT),
then written as GGUF files for llama.cpp.

Command: `jkd run experiments/edge_gguf/config.py --run-dir runs/edge_gguf` (the demo's data,
teacher and settings; sequence-level KD, the demo's best method, 3 seeds). The run folder gets the
usual report (the float student, the same weights at q4_0 after training, the QAT student) and
``gguf.md``: the seed-0 students written at f16, q8_0 and q4_0 with their file sizes. Override any
setting with ``--set``, e.g. ``--set student_steps=20`` for a quick look.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from jkd.jobs import lm as LX
from jkd.train.lm_steps import TokenKD


def get_config() -> LX.LMExperimentConfig:
    cfg = LX.demo_config()
    seq_kd = dict(objective=TokenKD(kd_weight=0.0, ce_weight=1.0), teacher_answers=True)
    return dataclasses.replace(
        cfg,
        title="The demo's 2-layer student for llama.cpp: float, q4_0 after training, q4_0 trained for it",
        students=(cfg.students[0],),
        pass_k=0,
        ptq="q4_0",
        distillations=(
            LX.LMDistillation("sequence KD", **seq_kd),
            LX.LMDistillation("sequence KD, q4_0-aware", **seq_kd, quantize="q4_0"),
        ),
    )


def main(
    cfg: LX.LMExperimentConfig, run_dir: str, *, resume: bool = False, force: bool = False, progress: bool = True
) -> None:
    from jkd.data.tokenizer import Tokenizer
    from jkd.runtime.run_folder import slug
    from jkd.models.gguf_io import write_gguf
    from jkd.models.hf import load_hf

    root = Path(run_dir)
    summary = LX.run(cfg, root, resume=resume, force=force, progress=progress)
    lines = ["# The students as GGUF files (seed 0)", "", "| student | file | type | size (MiB) |", "|---|---|---|---|"]
    for entry in summary["models"]:
        if entry["role"] == "teacher" or "after training" in (entry.get("quantization") or ""):
            continue  # a PTQ row is the float student's file at q4_0: written below from the float student
        folder = root / slug(entry["name"]) / "seed0"
        model, tok = load_hf(folder), Tokenizer.from_folder(folder)
        quants = ("q4_0",) if entry.get("quantization") else ("f16", "q8_0", "q4_0")
        for quant in quants:
            path = write_gguf(
                model, tok, root / "gguf" / f"{slug(entry['name'])}.{quant}.gguf", quant=quant, name=entry["name"]
            )
            lines.append(
                f"| {entry['name']} | {path.relative_to(root)} | {quant} | {path.stat().st_size / 2**20:.2f} |"
            )
    (root / "gguf.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

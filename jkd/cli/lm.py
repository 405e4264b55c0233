"""The language-model commands: ``jkd lm demo | distill | evaluate | generate | export``."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

from jkd.cli.common import apply_overrides, finite, mesh_flag, remat_flag, run_folder_flags, seed_list
from jkd.cli.flags import add_config_flags, config_overrides, same_names
from jkd.runtime.atomic import atomic_write

# The LMExperimentConfig fields `jkd lm distill` sets with flags of its own (field -> the flag's dest);
# every other plain field gets a flag of its name (jkd.cli.flags).
_DISTILL_FLAGS = {
    **same_names("max_length", "batch_size", "pack_length", "teacher_steps", "seeds", "max_new_tokens"),
    "train_file": "data",
    "test_file": "test",
    "unlabelled_file": "unlabelled",
    "teacher_dir": "teacher",
    "student_steps": "steps",
    "include_baseline": "no_baseline",
    "student_optimizer": "lr",
    "teacher_optimizer": "lr",
    "students": "student",
    "distillations": "mode",
    "mesh": "config.mesh",
    "remat": "config.remat",
    "tools_file": "tools",
    "tool_timeout_s": "tool_timeout",
}


def _config_class():
    from jkd.jobs.lm import LMExperimentConfig

    return LMExperimentConfig


def _tool_formats():
    from jkd.agents.formats import FORMATS

    return sorted(FORMATS)


LM_MODES = ("token", "stored", "sequence", "on-policy")
LM_LOSSES = {
    "fkl": "ForwardKL",
    "rkl": "ReverseKL",
    "jsd": "GeneralizedJSD",
    "skew-fkl": "SkewForwardKL",
    "skew-rkl": "SkewReverseKL",
    "tv": "TotalVariation",
}


def _lm_config(args):
    """``jkd lm distill``'s flags as an :class:`~jkd.jobs.lm.LMExperimentConfig`."""
    import jkd.losses as losses
    from jkd.jobs import lm as LX
    from jkd.train.lm_steps import OnPolicyKD, StoredTopKKD, TokenKD

    cls = getattr(losses, LM_LOSSES[args.loss])
    kw = {"beta": args.beta} if args.loss == "jsd" else {"alpha": args.alpha} if args.loss.startswith("skew") else {}
    divergence = cls(**kw)
    # named for what the student learns: with --kd-weight 0 no loss reads the teacher's distributions
    name = f"{args.mode} {args.loss}"
    if args.kd_weight == 0 and args.mode != "on-policy":
        name = "sequence CE" if args.mode == "sequence" else "labels only"
    if args.cross_tokenizer is not None:
        from jkd.train.lm_cross import CrossTokenizerKD

        if args.mode == "on-policy":
            raise ValueError(
                "--cross-tokenizer trains on the labelled conversations (--mode token, or --mode stored: "
                "the teacher's span values computed once) or with the teacher's answers too (--mode "
                "sequence); got --mode on-policy."
            )
        objective = CrossTokenizerKD(
            divergence=None if args.cross_tokenizer == "uld" else divergence,
            temperature=args.temperature,
            kd_weight=args.kd_weight,
            ce_weight=args.ce_weight,
            stored=args.mode == "stored",
        )
        if args.kd_weight != 0:
            name = f"{args.mode} uld" if args.cross_tokenizer == "uld" else f"{args.mode} hybrid {args.loss}"
    elif args.mode == "on-policy":
        objective = OnPolicyKD(
            divergence=divergence,
            temperature=args.temperature,
            student_fraction=args.student_fraction,
            max_new_tokens=args.max_new_tokens,
        )
    elif args.mode == "stored":
        if args.loss != "fkl":
            raise ValueError(
                f"--mode stored trains the forward KL to the teacher's stored top-k (--loss fkl); "
                f"got --loss {args.loss}."
            )
        objective = StoredTopKKD(
            temperature=args.temperature, kd_weight=args.kd_weight, ce_weight=args.ce_weight, top_k=args.top_k
        )
    else:
        objective = TokenKD(
            divergence=divergence, temperature=args.temperature, kd_weight=args.kd_weight, ce_weight=args.ce_weight
        )
    if args.mode in ("sequence", "on-policy") and not args.unlabelled:
        raise ValueError(
            f"--mode {args.mode} needs --unlabelled (requests the teacher answers or the student samples)."
        )
    student = _student(args.student, args.prune_width)
    from jkd.train import AdamWConfig

    opt = AdamWConfig(
        learning_rate=args.lr, weight_decay=args.weight_decay, warmup_epochs=0.1, warmup_steps=args.warmup_steps
    )
    cfg = LX.LMExperimentConfig(
        train_file=args.data,
        test_file=args.test,
        unlabelled_file=args.unlabelled,
        teacher_dir=args.teacher,
        students=(student,),
        max_length=args.max_length,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        pack_length=args.pack_length,
        student_steps=args.steps,
        teacher_steps=args.teacher_steps,
        teacher_optimizer=opt,
        student_optimizer=opt,
        labelled_subset=None,
        seeds=args.seeds,
        include_baseline=not args.no_baseline,
        tools_file=args.tools,
        tool_timeout_s=args.tool_timeout,
        distillations=(
            LX.LMDistillation(
                name,
                objective,
                teacher_answers=args.mode == "sequence",
                through_tools=(args.mode == "on-policy" and args.tools is not None) or None,
                quantize=args.quantize,
            ),
        ),
        title=f"{name} distillation of {args.data}",
    )
    cfg = dataclasses.replace(cfg, **config_overrides(args, LX.LMExperimentConfig))
    return apply_overrides(cfg, args.set)  # last: --set may change what the flags set


def _width(text: str | None) -> tuple[int | None, int | None] | None:
    """``--prune-width mlp=N,kv_heads=G`` as ``(N, G)`` (either may be left out)."""
    if text is None:
        return None
    keys = {}
    for part in text.split(","):
        key, _, value = part.partition("=")
        if key.strip() not in ("mlp", "kv_heads") or not value.strip().isdigit() or int(value) < 1:
            raise ValueError(
                f"--prune-width takes mlp=N and/or kv_heads=G (whole numbers >= 1), e.g. mlp=768,kv_heads=1; "
                f"got {text!r}."
            )
        keys[key.strip()] = int(value)
    return keys.get("mlp"), keys.get("kv_heads")


def _student(text: str, prune_width: str | None = None):
    """``--student``: ``layers=0,6,12`` (the teacher's blocks; ``--prune-width`` narrows them), a
    folder (architecture and weights), or ``WIDTHxLAYERS`` (a random decoder of that size)."""
    from jkd.jobs import lm as LX
    from jkd.models.hf import read_config

    width = _width(prune_width)
    if width is not None and not text.startswith("layers="):
        raise ValueError(
            f"--prune-width narrows a student cut from the teacher (--student layers=...); got --student {text!r}."
        )
    if text.startswith("layers="):
        try:
            layers = tuple(int(x) for x in text[len("layers=") :].split(","))
        except ValueError:
            raise ValueError(
                f"--student layers=... takes the teacher's block numbers, e.g. layers=0,6,12; got {text!r}."
            ) from None
        name = f"student layers {','.join(map(str, layers))}"
        if width is not None:
            name += "".join(f" {k} {v}" for k, v in zip(("mlp", "kv"), width) if v is not None)
        return LX.LMStudent(name, teacher_layers=layers, width=width)
    if Path(text).is_dir():
        read_config(text)  # refused here, before anything runs, if jkd cannot read it
        return LX.LMStudent(f"student {Path(text).name}", from_dir=text)
    try:
        width, layers = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise ValueError(
            f"--student must be WIDTHxLAYERS (e.g. 64x2), layers=I,J,... (blocks of the teacher) or a "
            f"Hugging Face folder; got {text!r}."
        ) from None
    return LX.LMStudent(f"student {text}", LX._decoder(1024, width, layers))


def add_commands(sub) -> None:
    lm = sub.add_parser("lm", help="language models: distil a tool-using model into a small one")
    lm_sub = lm.add_subparsers(dest="lm_command", required=True)
    lm_demo = lm_sub.add_parser("demo", help="the agent demo on the embedded tool-use conversations (no network)")
    lm_demo.set_defaults(handler=demo_command)
    run_folder_flags(lm_demo, run_dir="runs/lm_demo")
    lm_demo.add_argument(
        "--set", action="append", metavar="KEY=VALUE", help="override a config field, e.g. student_steps=50"
    )
    mesh_flag(lm_demo)
    remat_flag(lm_demo)
    add_config_flags(lm_demo, _config_class(), hand_written={"mesh": "config.mesh", "remat": "config.remat"})

    lm_dist = lm_sub.add_parser(
        "distill",
        help="distil your own conversations: a teacher (trained here or a "
        "Hugging Face folder) into a small student, measured against the student alone",
    )
    lm_dist.set_defaults(handler=distill_command)
    run_folder_flags(lm_dist, run_dir="runs/lm")
    lm_dist.add_argument("--data", required=True, help="labelled conversations, .jsonl (chat messages per line)")
    lm_dist.add_argument("--test", required=True, help="held-out conversations, .jsonl")
    lm_dist.add_argument("--unlabelled", help="requests without answers, .jsonl (sequence-level and on-policy modes)")
    lm_dist.add_argument(
        "--teacher",
        help="a Hugging Face model folder (Llama / Qwen2 / Qwen3) with its "
        "tokenizer; default: train a teacher here on --data",
    )
    lm_dist.add_argument(
        "--student",
        default="64x2",
        help="the student: WIDTHxLAYERS (a random decoder, default "
        "64x2), layers=0,6,12 (those blocks of the teacher, with its embeddings and head), or a "
        "Hugging Face folder (its architecture and weights)",
    )
    lm_dist.add_argument(
        "--prune-width",
        metavar="mlp=N,kv_heads=G",
        help="with --student layers=...: keep the N "
        "most important MLP channels and G key/value heads (with their query heads) of every block, "
        "by their activations on a labelled batch (Minitron's width pruning)",
    )
    lm_dist.add_argument(
        "--mode",
        choices=LM_MODES,
        default="token",
        help="token: the teacher runs beside the student every step; stored: its top-k "
        "(--top-k) computed once and kept in the run folder, no teacher forward per step; "
        "sequence: the student learns the teacher's answers to --unlabelled; on-policy: "
        "the student's own samples, scored by the teacher",
    )
    lm_dist.add_argument(
        "--cross-tokenizer",
        choices=("uld", "hybrid"),
        default=None,
        help="a student folder with its own tokenizer: uld (the sorted probabilities of each span "
        "where the two tokenizations meet) or hybrid (--loss on the spans that are one token "
        "with the same string in both, ULD elsewhere)",
    )
    lm_dist.add_argument("--top-k", type=int, default=8, help="stored mode: the teacher's tokens kept per position")
    lm_dist.add_argument("--loss", choices=sorted(LM_LOSSES), default="fkl")
    lm_dist.add_argument("--temperature", type=finite, default=1.0)
    lm_dist.add_argument("--beta", type=finite, default=0.5, help="JSD interpolation (jsd)")
    lm_dist.add_argument("--alpha", type=finite, default=0.1, help="skew of skew-fkl / skew-rkl")
    lm_dist.add_argument(
        "--lambda",
        dest="student_fraction",
        type=finite,
        default=0.5,
        help="on-policy: the share of steps on the student's own samples",
    )
    lm_dist.add_argument("--kd-weight", type=finite, default=1.0)
    lm_dist.add_argument("--ce-weight", type=finite, default=0.0)
    lm_dist.add_argument(
        "--quantize",
        choices=("q8_0", "q4_0"),
        help="quantization-aware distillation: the student "
        "trains with its weights as a GGUF file of this type holds them (jkd lm export --format gguf "
        "--quant), and is measured so; --ptq measures the float student quantized after training",
    )
    lm_dist.add_argument("--max-length", type=int, default=256, help="tokens per sequence (longer ones are cut)")
    lm_dist.add_argument("--max-new-tokens", type=int, default=64)
    lm_dist.add_argument("--batch-size", type=int, default=16, help="rows per step (of --pack-length when packing)")
    lm_dist.add_argument(
        "--pack-length",
        type=int,
        default=None,
        help="pack whole conversations into rows of this "
        "many tokens (at least --max-length; on-policy steps keep one prompt per row)",
    )
    lm_dist.add_argument("--steps", type=int, default=200, help="student optimizer steps")
    lm_dist.add_argument("--teacher-steps", type=int, default=400, help="teacher steps (when trained here)")
    lm_dist.add_argument("--lr", type=finite, default=3e-3)
    lm_dist.add_argument(
        "--warmup-steps",
        type=int,
        default=None,
        help="optimizer steps of linear warm-up before the cosine decay (default: a tenth of an epoch)",
    )
    lm_dist.add_argument(
        "--weight-decay", type=finite, default=0.0, help="AdamW's decoupled weight decay (matrices only)"
    )
    lm_dist.add_argument("--seeds", type=seed_list, default=(0,))
    lm_dist.add_argument("--no-baseline", action="store_true", help="skip the student alone")
    lm_dist.add_argument(
        "--tools",
        help="a .py module of plain functions (type hints, docstrings) that the agent "
        "loop runs: the teacher's calls in --mode sequence; offered to conversations naming no tools",
    )
    lm_dist.add_argument(
        "--tool-timeout",
        type=finite,
        default=None,
        help="seconds a tool call may run before it is stopped and reported (default 30)",
    )
    mesh_flag(lm_dist)
    remat_flag(lm_dist)
    lm_dist.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override a config field after the flags, e.g. student_optimizer.eps=1e-6",
    )

    add_config_flags(
        lm_dist,
        _config_class(),
        hand_written=_DISTILL_FLAGS,
        defaults={"labelled_subset": None, "title": "MODE distillation (LOSS) of DATA"},
    )

    lm_eval = lm_sub.add_parser(
        "evaluate", help="tool-use metrics and cross-entropy of a Hugging Face model folder on test conversations"
    )
    lm_eval.set_defaults(handler=evaluate_command)
    lm_eval.add_argument(
        "model", help="a Hugging Face model folder with its tokenizer (e.g. runs/lm_demo/<group>/seed0)"
    )
    lm_eval.add_argument("--test", required=True, help="conversations, .jsonl")
    lm_eval.add_argument("--max-length", type=int, default=256)
    lm_eval.add_argument("--max-new-tokens", type=int, default=64)
    lm_eval.add_argument("--out", help="also write the metrics to this JSON file")
    lm_eval.add_argument(
        "--tool-format",
        choices=_tool_formats(),
        default=None,
        help="how the model writes tool calls (default: read off its chat template)",
    )
    lm_eval.add_argument(
        "--tools",
        help="a .py module of tools: the conversations are also played as whole tasks in the loop (task success)",
    )
    lm_eval.add_argument("--tool-timeout", type=finite, default=30.0)
    lm_eval.add_argument("--max-turns", type=int, default=3, help="assistant turns per task in the loop")
    lm_eval.add_argument("--pass-k", type=int, default=0, help="sampled trials per task for pass^k (0: none)")
    lm_eval.add_argument("--pass-temperature", type=finite, default=1.0)
    lm_gen = lm_sub.add_parser("generate", help="answer requests with a Hugging Face model folder")
    lm_gen.set_defaults(handler=generate_command)
    lm_gen.add_argument("model", help="a Hugging Face model folder with its tokenizer")
    lm_gen.add_argument("--prompt", action="append", required=True, help="a user message (repeatable)")
    lm_gen.add_argument("--max-new-tokens", type=int, default=64)
    lm_gen.add_argument("--temperature", type=finite, default=0.0, help="0: greedy")
    lm_gen.add_argument("--seed", type=int, default=0)

    lm_exp = lm_sub.add_parser(
        "export",
        help="a Hugging Face model folder as a GGUF file for llama.cpp and the "
        "tools built on it (Ollama, LM Studio), or its forward pass as StableHLO (tokens -> "
        "logits, any batch and length) with its tokenizer",
    )
    lm_exp.set_defaults(handler=export_command)
    lm_exp.add_argument("model", help="a Hugging Face model folder with its tokenizer")
    lm_exp.add_argument("--format", choices=("stablehlo", "gguf"), default="stablehlo")
    lm_exp.add_argument(
        "--out",
        required=True,
        help="stablehlo: the folder to write (model.stablehlo, serving.json, tokenizer); gguf: the .gguf file",
    )
    lm_exp.add_argument(
        "--quant",
        choices=("f32", "f16", "q8_0", "q4_0"),
        default="q8_0",
        help="gguf: the weights' type, by llama.cpp's names (q4_0 keeps the embedding and the output head at q8_0)",
    )
    lm_exp.add_argument(
        "--gguf-pre",
        help="gguf: llama.cpp's name of the tokenizer's pre-tokenizer when jkd cannot "
        "recognise it (e.g. llama-bpe, qwen2)",
    )


def demo_command(args) -> int:
    from jkd.jobs import lm as LX

    cfg = dataclasses.replace(
        apply_overrides(LX.demo_config(), args.set), **config_overrides(args, LX.LMExperimentConfig)
    )
    LX.run(cfg, args.run_dir, resume=True, force=args.force, progress=not args.no_progress)
    return 0


def distill_command(args) -> int:
    from jkd.jobs import lm as LX

    LX.run(_lm_config(args), args.run_dir, resume=args.resume, force=args.force, progress=not args.no_progress)
    return 0


def evaluate_command(args) -> int:
    from jkd.jobs.measure import evaluate_saved_lm

    metrics = evaluate_saved_lm(
        args.model,
        args.test,
        max_length=args.max_length,
        max_new_tokens=args.max_new_tokens,
        tool_format=args.tool_format,
        tools_file=args.tools,
        tool_timeout_s=args.tool_timeout,
        max_turns=args.max_turns,
        pass_k=args.pass_k,
        pass_temperature=args.pass_temperature,
    )
    text = json.dumps(metrics, indent=2)
    print(text)
    for warning in metrics["warnings"]:
        print("warning: " + warning, file=sys.stderr)
    if args.out:
        atomic_write(args.out, text + "\n")
    return 0


def export_command(args) -> int:
    from jkd.export import export_lm_stablehlo

    model, tok = _lm_model(args.model)
    out = Path(args.out)
    if args.format == "gguf":
        from jkd.models.gguf_io import write_gguf

        if out.is_dir():
            raise IsADirectoryError(f"--out {out} is a folder; name the .gguf file to write")
        write_gguf(model, tok, out, quant=args.quant, name=Path(args.model).name, pre_tokenizer=args.gguf_pre)
        print(
            f"wrote {out} ({args.quant}, {out.stat().st_size / 2**20:.1f} MiB): run it with llama.cpp, e.g. "
            f"llama-cli -m {out}"
        )
        return 0
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty; choose another --out.")
    export_lm_stablehlo(model, out)
    tok.save(out)
    print(f"wrote {out}/model.stablehlo (tokens, attention_mask -> logits) and the tokenizer")
    return 0


def _lm_model(folder: str):
    from jkd.data.tokenizer import Tokenizer
    from jkd.models.hf import load_hf

    return load_hf(folder), Tokenizer.from_folder(folder)


def generate_command(args) -> int:
    from jkd.data.chat import encode_chat
    from jkd.models.sampler import SamplingConfig, generate

    model, tok = _lm_model(args.model)
    prompts = [encode_chat(tok, [{"role": "user", "content": p}], add_generation_prompt=True).ids for p in args.prompt]
    sampling = SamplingConfig(temperature=args.temperature) if args.temperature > 0 else SamplingConfig()
    out = generate(model, prompts, max_new_tokens=args.max_new_tokens, sampling=sampling, key=args.seed)
    for prompt, row in zip(args.prompt, out.rows()):
        print(f"> {prompt}\n{tok.decode(row, skip_special_tokens=True)}\n")
    return 0

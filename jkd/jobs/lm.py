"""The language-model job: a teacher, students alone and distilled, measured as agents, reported.

One run is one :class:`LMExperimentConfig`; :func:`run` carries it out in a run folder with the
image side's conventions (:mod:`jkd.runtime.run_folder`: the config guard, ``--resume``, ``log.jsonl``,
TensorBoard events; checkpoints per trained group; ``summary.json`` and ``report.md``)::

    run_dir/data/                 the embedded conversations (when no data is given)
    run_dir/tokenizer/            the tokenizer (trained here for the embedded data)
    run_dir/teacher/model/        the teacher as a Hugging Face folder (trained here once, or given)
    run_dir/answers/              the teacher's answers to the unlabelled requests (cached, resumable)
    run_dir/<group>/ckpt/         checkpoints of a group's training (all seeds in one vmapped state)
    run_dir/<group>/seed<k>/      each trained student as a Hugging Face folder
    run_dir/<group>/metrics.json  its test metrics per seed
    run_dir/summary.json, report.md, *.png, samples.md

The ways to distil (:class:`LMDistillation`): token-level KD on the labelled conversations
(``TokenKD``), sequence-level KD (``teacher_answers=True``: the unlabelled requests answered by
the teacher join the training data) and on-policy distillation (``OnPolicyKD``: the student's
own samples of the requests, scored by the teacher).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
import time
from pathlib import Path
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jkd.data import conversations as C
from jkd.data import toolchat
from jkd.data.tokenizer import Tokenizer, train_bpe_tokenizer
from jkd.data.chat import render_chat
from jkd.data.align import AlignedRows, aligned_rows, shared_tokens, with_spans
from jkd.data.vocab import VocabularyMismatchError, same_tokens, shared_vocabulary
from jkd.jobs.lm_evaluation import BUCKETS, measure
from jkd.evaluate import report
from jkd.jobs.lm_report import build_report
from jkd.losses import ForwardKL, GeneralizedJSD
from jkd.models.attention import BlockedAttention, FusedAttention, SplashAttention, for_backend
from jkd.models.decoder import Decoder, set_attention, set_remat
from jkd.models.decoder_config import DecoderConfig
from jkd.models.decoder_sharding import make_mesh, tree_shardings
from jkd.models.decoder_surgery import narrower_config, prune_width, select_layers, width_importance
from jkd.models.hf import load_hf, read_config, save_hf
from jkd.runtime import hosts
from jkd.runtime.faults import missing_folder
from jkd.jobs.seeds import mean_std
from jkd.jobs.skeleton import Job, Run, Trained, run_job
from jkd.jobs.teacher import SAVED_TEACHER, teacher_source
from jkd.runtime.run_folder import slug
from jkd.train import AdamWConfig, create_train_state, freeze_model, make_optimizer, stack_states
from jkd.train.state import split_model
from jkd.train.lm_cross import CrossTokenizerKD, cross_tokenizer_step, store_span_teacher
from jkd.train.lm_sequence import teacher_answers
from jkd.train.lm_steps import (
    OnPolicyKD,
    StoredTopKKD,
    TokenKD,
    in_compute_dtype,
    on_policy_step,
    stored_topk_step,
    token_kd_step,
)
from jkd.train.loop import LoopConfig
from jkd.train import memory_plan as MP
from jkd.train.stored import INDICES, VALUES, StoredTopK, store_sequence_topk, teacher_identity, with_teacher_targets
from jkd.models.sampler import SamplingConfig, bucket_length, generate
from jkd.agents.formats import by_name, tool_format_for
from jkd.evaluate.toolcalls import format_warning
from jkd.agents.loop import agent_exchanges, exchange_conversations, exchange_rows
from jkd.agents.tasks import TASK_SUCCESS_RULE, Task, run_tasks, tasks_from, trajectory_rows
from jkd.agents.tools import OK, RAISED, REFUSED, TIMED_OUT, Toolbox
from jkd.compress.gguf_blocks import fake_quantize


@dataclasses.dataclass(frozen=True)
class LMDistillation:
    """One distilled-student setting: a display name, its objective and its data.

    ``objective``: :class:`~jkd.train.lm_steps.TokenKD`, :class:`~jkd.train.lm_steps.OnPolicyKD`,
    :class:`~jkd.train.lm_steps.StoredTopKKD` (the teacher's top-k stored once over the labelled
    conversations, then no teacher forward pass per step) or
    :class:`~jkd.train.lm_cross.CrossTokenizerKD` (a student folder with its own tokenizer: ULD or
    GOLD's hybrid over the spans where the two tokenizations meet; with ``teacher_answers`` on the
    answered requests too).
    ``teacher_answers``: the unlabelled requests, answered by the teacher, join the labelled
    conversations (sequence-level KD; with ``TokenKD(kd_weight > 0)`` the student also matches the
    teacher's distributions on them). On-policy distillation always samples the requests.
    ``all_labels``: the labelled rows are all the labelled conversations (those the teacher saw),
    not the students' ``labelled_subset``.
    ``quantize`` (``q8_0``, ``q4_0``: llama.cpp's types): quantization-aware distillation, the
    student's passes see its weights as a GGUF file of that type holds them
    (:mod:`jkd.compress.gguf_blocks`, straight-through gradients); it is measured so, as
    ``jkd lm export --format gguf --quant`` will write it.
    ``through_tools`` (with ``OnPolicyKD``, where tools run the calls): the student's samples are
    whole trajectories through the agent loop (its call, the tools' result, its answer; up to
    ``max_turns`` turns), played on the host with its weights of that step, every turn of it scored
    by the teacher, the tools' results and the prompts never trained on.
    """

    name: str
    objective: TokenKD | OnPolicyKD | StoredTopKKD | CrossTokenizerKD
    teacher_answers: bool = False
    through_tools: bool | None = None  # on-policy: the student's own trajectories through the tools, many turns
    # (None: no; new fields default to None so earlier run folders resume)
    all_labels: bool | None = None  # train on every labelled conversation (the teacher's), not the students'
    # subset: what more labels alone give
    quantize: str | None = None  # q8_0 / q4_0: trained with its weights as that GGUF type holds them (QAT),
    # measured so


@dataclasses.dataclass(frozen=True)
class LMStudent:
    """A student: a display name and one of three starts.

    ``config``: a decoder config (its vocabulary set from the tokenizer), randomly initialised.
    ``teacher_layers``: the teacher's architecture with these of its blocks; distilled students
    start from those blocks of the teacher and its embeddings, final norm and head
    (:func:`jkd.models.decoder_surgery.select_layers`, as DistilBERT and Minitron's depth pruning
    start), the student alone from a random initialisation of the same architecture (no teacher).
    ``from_dir``: a Hugging Face folder whose architecture and weights every setting of this
    student starts from, the student alone too (a pre-trained small model); its vocabulary must be
    the tokenizer's (padding rows aside), never changed silently.
    """

    name: str
    config: DecoderConfig | None = None
    teacher_layers: tuple[int, ...] | None = None
    from_dir: str | None = None
    width: tuple[int | None, int | None] | None = None  # with teacher_layers: (MLP channels, key/value heads)
    # kept per layer, by activation importance (Minitron)

    def __post_init__(self):
        if sum(x is not None for x in (self.config, self.teacher_layers, self.from_dir)) != 1:
            raise ValueError(f"LMStudent {self.name!r}: give one of config, teacher_layers or from_dir")
        if self.width is not None and self.teacher_layers is None:
            raise ValueError(
                f"LMStudent {self.name!r}: width pruning applies to a student cut from the teacher "
                "(teacher_layers, --student layers=...)"
            )

    def cut_config(self, teacher: DecoderConfig) -> DecoderConfig:
        """The architecture of a student cut from ``teacher`` (its layers, then its width)."""
        mlp, kv = self.width or (None, None)
        return narrower_config(
            dataclasses.replace(teacher, num_layers=len(self.teacher_layers)), intermediate_size=mlp, num_kv_heads=kv
        )


DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}  # the dtype and teacher_dtype settings
ATTENTION = {
    "blocked": BlockedAttention(),
    "cudnn": FusedAttention("cudnn"),
    "xla": FusedAttention("xla"),
    "splash": SplashAttention(),
}


def _decoder(vocab: int, hidden: int, layers: int, heads: int = 4, kv_heads: int = 2, mlp: int = 3) -> DecoderConfig:
    return DecoderConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=mlp * hidden,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        max_position_embeddings=256,
        tie_embeddings=True,
    )


@dataclasses.dataclass(frozen=True)
class LMExperimentConfig:
    train_file: str | None = None  # labelled conversations (.jsonl); None: the embedded ones
    test_file: str | None = None  # held-out conversations (.jsonl), needed with train_file
    unlabelled_file: str | None = None  # requests without answers (.jsonl), optional
    data_seed: int = 0  # the embedded generator's seed
    data_sizes: tuple[tuple[str, int], ...] = ()  # embedded split sizes overriding toolchat.SPLITS
    teacher_dir: str | None = None  # a Hugging Face teacher folder (skip teacher training)
    teacher: DecoderConfig = _decoder(1024, 128, 4)
    students: tuple[LMStudent, ...] = (LMStudent("student 64x2", _decoder(1024, 64, 2)),)
    vocab_size: int = 1024  # the BPE trained on the embedded data
    max_length: int = 128  # tokens per training sequence (the truncation rule: jkd.data.conversations)
    batch_size: int = 16  # rows per step (of max_length, or of pack_length when packing)
    pack_length: int | None = None  # pack whole conversations into rows of this many tokens (None: one per row)
    teacher_steps: int = 1000
    student_steps: int = 150
    teacher_optimizer: AdamWConfig = AdamWConfig(learning_rate=3e-3, weight_decay=0.0, warmup_epochs=0.1)
    student_optimizer: AdamWConfig = AdamWConfig(learning_rate=3e-3, weight_decay=0.0, warmup_epochs=0.1)
    labelled_subset: int | None = 300  # labelled conversations the students see (None: all)
    unlabelled_limit: int | None = None  # unlabelled requests used (None: all)
    test_limit: int | None = None  # test conversations measured (None: all)
    seeds: tuple[int, ...] = (0, 1, 2)
    include_baseline: bool = True
    distillations: tuple[LMDistillation, ...] = ()
    max_new_tokens: int = 64
    answer_temperature: float = 0.0  # the teacher's answers: 0 greedy
    title: str = "language-model distillation"
    devices: int | None = None  # jit over a mesh of this many devices (data parallel); None: one device
    mesh: tuple[int, int] | None = None  # (data, model): the decoders' matrices split over model (tensor
    # parallel) and data (fully sharded), the batch over data
    micro_batches: int | None = None  # token-KD steps in this many rounds of gradient accumulation (None: 1)
    remat: bool | None = None  # recompute each decoder block in the backward pass (less memory)
    dtype: str | None = None  # bfloat16: the passes of training in bfloat16, float32 master weights
    # and optimizer state (None: float32)
    teacher_dtype: str | None = None  # bfloat16 or float32: the teacher's weights and passes (None: float32)
    memory_limit_gib: float | None = None  # refuse a run whose planned peak per device is above this (None: the
    # device's memory where JAX reports it)
    attention: str | None = None  # blocked (jkd's XLA attention), cudnn (cuDNN's flash attention, GPUs,
    # bfloat16), splash (Pallas, TPUs) or xla (jax.nn.dot_product_attention's);
    # None: cudnn on a GPU in bfloat16, splash on one TPU, else blocked
    tools_file: str | None = None  # a .py module of plain functions the agent loop runs (jkd.agents.tools);
    # None: the simulated tools with the embedded data, else no tools
    tool_timeout_s: float | None = None  # a tool call running longer is stopped and reported (None: 30 s)
    max_turns: int = 3  # measured tasks: the most assistant turns in the loop
    pass_k: int = 0  # measured tasks: sampled trials per task for pass^k (0: greedy only)
    pass_temperature: float = 1.0  # the temperature of those trials
    tool_format: str | None = None  # how the models write tool calls: hermes, llama3_json, mistral or json
    # (None: read off the chat template, jkd.agents.formats.detect_format)
    ptq: str | None = None  # q8_0 / q4_0: each student also measured with its weights quantized
    # after training, as that GGUF type holds them (a row of its own)

    def validate(self) -> None:
        for field in ("max_length", "batch_size", "teacher_steps", "student_steps", "max_new_tokens", "vocab_size"):
            if getattr(self, field) < 1:
                raise ValueError(f"{field} must be >= 1; got {getattr(self, field)}.")
        if not (
            isinstance(self.answer_temperature, (int, float))
            and math.isfinite(self.answer_temperature)
            and self.answer_temperature >= 0
        ):
            raise ValueError(
                f"answer_temperature must be a finite number >= 0 (0: greedy); got {self.answer_temperature!r}."
            )
        if self.teacher_dir is not None and not Path(self.teacher_dir).is_dir():
            raise missing_folder(self.teacher_dir, what="the teacher (--teacher)")
        for s in self.students:
            if s.from_dir is not None and not Path(s.from_dir).is_dir():
                raise missing_folder(s.from_dir, what="the student (--student)")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must name distinct seeds; got {list(self.seeds)}.")
        names = [d.name for d in self.distillations] + [s.name for s in self.students]
        if len(set(names)) != len(names):
            raise ValueError(f"student and distillation names must be distinct; got {names}.")
        for quant, where in (
            (self.ptq, "ptq (--ptq)"),
            *((d.quantize, f"{d.name}: quantize") for d in self.distillations),
        ):
            if quant is not None and quant not in ("q8_0", "q4_0"):
                raise ValueError(f"{where} must be q8_0 or q4_0 (llama.cpp's block types); got {quant!r}.")
        for d in self.distillations:
            if not isinstance(d.objective, (TokenKD, OnPolicyKD, StoredTopKKD, CrossTokenizerKD)):
                raise TypeError(
                    f"{d.name}: objective must be TokenKD, OnPolicyKD, StoredTopKKD or CrossTokenizerKD; "
                    f"got {type(d.objective).__name__}."
                )
            if isinstance(d.objective, CrossTokenizerKD) and (self.pack_length is not None or d.quantize):
                raise ValueError(
                    f"{d.name}: cross-tokenizer distillation runs one conversation per row, in float: "
                    "it does not combine with packed rows (pack_length, --pack-length) or quantize."
                )
            if d.all_labels and isinstance(d.objective, StoredTopKKD):
                raise ValueError(
                    f"{d.name}: stored top-k outputs are kept for the students' labelled subset; "
                    "all_labels trains on every labelled conversation."
                )
            if d.through_tools and not isinstance(d.objective, OnPolicyKD):
                raise ValueError(
                    f"{d.name}: through_tools samples the student's trajectories: it needs an OnPolicyKD "
                    f"objective; got {type(d.objective).__name__}."
                )
            if isinstance(d.objective, StoredTopKKD) and (d.teacher_answers or self.pack_length is not None):
                raise ValueError(
                    f"{d.name}: stored top-k outputs are kept per labelled conversation, one per row: "
                    "they do not combine with packed rows (pack_length, --pack-length) or the "
                    "teacher's answers (sequence mode)."
                )
        if not self.students:
            raise ValueError("students must name at least one student.")
        if self.train_file is not None and self.test_file is None:
            raise ValueError(
                "test_file (--test) is needed with train_file (--data): the metrics are measured "
                "on held-out conversations."
            )
        if self.pack_length is not None and self.pack_length < self.max_length:
            raise ValueError(
                f"pack_length ({self.pack_length}) must hold a whole conversation of max_length "
                f"({self.max_length}) tokens."
            )
        self._check_devices()
        if self.memory_limit_gib is not None and not (
            isinstance(self.memory_limit_gib, (int, float))
            and math.isfinite(self.memory_limit_gib)
            and self.memory_limit_gib > 0
        ):
            raise ValueError(
                f"memory_limit_gib (--memory-limit-gib) must be a number > 0; got {self.memory_limit_gib!r}."
            )
        if self.tool_format is not None:
            by_name(self.tool_format)  # an unknown name is refused with the known ones
        if self.tools_file is not None and not Path(self.tools_file).is_file():
            raise FileNotFoundError(
                f"{self.tools_file}: no such tools module (--tools takes a .py file of plain "
                "functions with type hints and docstrings)"
            )
        for field in ("max_turns", "pass_k"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value < (1 if field == "max_turns" else 0):
                raise ValueError(
                    f"{field} (--{field.replace('_', '-')}) must be a whole number >= "
                    f"{1 if field == 'max_turns' else 0}; got {value!r}."
                )
        if not (
            isinstance(self.pass_temperature, (int, float))
            and math.isfinite(self.pass_temperature)
            and self.pass_temperature > 0
        ):
            raise ValueError(
                f"pass_temperature (--pass-temperature) must be a number > 0; got {self.pass_temperature!r}."
            )
        if self.tool_timeout_s is not None and not (
            isinstance(self.tool_timeout_s, (int, float))
            and math.isfinite(self.tool_timeout_s)
            and self.tool_timeout_s > 0
        ):
            raise ValueError(
                f"tool_timeout_s (--tool-timeout) must be a number of seconds > 0; got {self.tool_timeout_s!r}."
            )
        if self.attention not in (None, *ATTENTION):
            raise ValueError(f"attention (--attention) must be one of {', '.join(ATTENTION)}; got {self.attention!r}.")
        for field in ("dtype", "teacher_dtype"):
            if getattr(self, field) not in (None, *DTYPES):
                raise ValueError(
                    f"{field} (--{field.replace('_', '-')}) must be one of {', '.join(DTYPES)}; got "
                    f"{getattr(self, field)!r}."
                )
        if self.micro_batches is not None:
            if (
                not isinstance(self.micro_batches, int)
                or self.micro_batches < 1
                or self.batch_size % self.micro_batches
            ):
                raise ValueError(
                    f"micro_batches (--micro-batches) must be a whole number >= 1 that divides batch_size "
                    f"({self.batch_size}); got {self.micro_batches!r}."
                )
            others = [d.name for d in self.distillations if not isinstance(d.objective, TokenKD)]
            if self.micro_batches > 1 and others:
                raise ValueError(
                    f"micro_batches (--micro-batches) applies to token-KD steps; {', '.join(others)} run whole batches."
                )
        if self.labelled_subset is not None and self.labelled_subset < self.batch_size:
            raise ValueError(
                f"labelled_subset ({self.labelled_subset}) must hold at least one batch ({self.batch_size})."
            )

    @property
    def tool_timeout(self) -> float:
        """Seconds a tool call may run (``tool_timeout_s``, or 30)."""
        return 30.0 if self.tool_timeout_s is None else float(self.tool_timeout_s)

    def mesh_shape(self) -> tuple[int, int] | None:
        """``(data, model)`` of the device mesh the steps run on, None for one device."""
        if self.mesh is not None:
            return tuple(self.mesh)
        return None if self.devices is None else (self.devices, 1)

    def _check_devices(self) -> None:
        if self.mesh is not None:
            if len(self.mesh) != 2 or not all(
                isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in self.mesh
            ):
                raise ValueError(f"mesh (--mesh) must be data=D,model=M with D, M >= 1; got {self.mesh!r}.")
            if self.devices is not None and self.devices != self.mesh[0] * self.mesh[1]:
                raise ValueError(
                    f"devices={self.devices} (--devices) but the mesh data={self.mesh[0]},model="
                    f"{self.mesh[1]} has {self.mesh[0] * self.mesh[1]}; give one of them."
                )
        shape = self.mesh_shape()
        if jax.process_count() > 1:  # a run of several processes takes one mesh over all their devices
            if shape is not None and shape[0] * shape[1] != jax.device_count():
                raise ValueError(
                    f"a run over {jax.process_count()} processes uses all {jax.device_count()} devices of "
                    f"its hosts; the mesh data={shape[0]},model={shape[1]} has {shape[0] * shape[1]}."
                )
            shape = shape or (jax.device_count(), 1)
        if shape is None:
            return
        available = jax.device_count()
        if not 1 <= shape[0] * shape[1] <= available:
            raise ValueError(
                f"the mesh data={shape[0]},model={shape[1]} needs {shape[0] * shape[1]} devices; this "
                f"machine has {available}."
            )
        rows = {self.batch_size}
        if any(isinstance(d.objective, OnPolicyKD) for d in self.distillations) and self.pack_length is not None:
            rows.add(max(self.batch_size * self.pack_length // self.max_length, 1))  # on-policy rows under packing
        for n in sorted(rows):
            if n % shape[0]:
                raise ValueError(
                    f"batch_size (--batch-size) {self.batch_size} gives steps of {n} rows, which do not "
                    f"split over the mesh's {shape[0]} data shards; choose a batch size that does."
                )


def demo_config() -> LMExperimentConfig:
    """What ``jkd lm demo`` runs: the embedded tool-use conversations; a 4-layer teacher trained on
    all 3,000 labelled ones; students of 2 and 1 of its layers in the setting a practitioner faces:
    few labelled conversations (100), many unlabelled requests (3,000), a teacher clearly better
    than what the labels give. Each student alone, and from the teacher's layers: on the 100 labels
    (the control), on all 3,000 labels (what more labels give), and distilled three ways; 3 seeds."""
    return LMExperimentConfig(
        title="jkd lm demo: distilling a tool-using model on the embedded conversations",
        students=(
            LMStudent("student 2 layers", teacher_layers=(0, 3)),
            LMStudent("student 1 layer", teacher_layers=(0,)),
        ),
        labelled_subset=100,
        student_steps=100,
        test_limit=150,
        pass_k=3,  # each test task also played 3 times sampled at temperature 1: pass^3
        # whole conversations packed into 6 rows of 256 tokens: ~17 a step (as 16 unpacked rows of
        # 128 held) in 3/4 of the token slots (docs/guides/benchmarks.md)
        pack_length=256,
        batch_size=6,
        distillations=(
            # the teacher's layers with the labels alone: what the initialisation gives without a KD loss
            LMDistillation("teacher layers + labels", TokenKD(kd_weight=0.0, ce_weight=1.0)),
            # ... and with every label the teacher saw: what labels alone can give
            LMDistillation("teacher layers + all labels", TokenKD(kd_weight=0.0, ce_weight=1.0), all_labels=True),
            LMDistillation("token KD fkl", TokenKD(divergence=ForwardKL(), kd_weight=1.0, ce_weight=0.0)),
            LMDistillation("sequence KD", TokenKD(kd_weight=0.0, ce_weight=1.0), teacher_answers=True),
            LMDistillation(
                "on-policy jsd",
                OnPolicyKD(divergence=GeneralizedJSD(beta=0.5), student_fraction=0.5, max_new_tokens=48),
                through_tools=True,
            ),
        ),
    )


# ---- data ------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Data:
    tokenizer: Tokenizer
    train: list[dict]
    labelled: list[dict]
    test: list[dict]
    unlabelled: list[dict]
    counts: dict


@dataclasses.dataclass
class _View:
    """The run's conversations as one tokenizer reads them (the teacher's, or a student's own):
    its pad and end ids, its tool-call format (and the report's line on it), the conversations as
    its chat template takes them, their encodings, the test turns and tasks."""

    tokenizer: Tokenizer
    pad_id: int
    eos_id: int | None
    tool_format: object
    tool_format_line: str
    train: list[dict]
    labelled: list[dict]
    test: list[dict]
    unlabelled: list[dict]
    encode: Callable[[list[dict]], object]  # conversations -> their encodings in this tokenizer
    labelled_enc: object
    test_enc: object
    test_tasks: list
    test_turns: list = dataclasses.field(default_factory=list)

    @functools.cached_property
    def train_enc(self):
        """The whole ``train`` split encoded: read by the teacher trained here and by ``all_labels``
        groups only, so a student's view encodes it when first asked."""
        return self.encode(self.train)


def _offered(convs: list[dict], schemas: list[dict] | None) -> list[dict]:
    """Conversations that name no tools of their own, offered ``schemas`` (None: as they are)."""
    return convs if schemas is None else [c if c.get("tools") else {**c, "tools": schemas} for c in convs]


def _read_data(cfg: LMExperimentConfig, run_dir: Path, echo, tools: Toolbox | None = None) -> _Data:
    if cfg.train_file is None:
        paths = toolchat.write_dataset(run_dir / "data", seed=cfg.data_seed, sizes=dict(cfg.data_sizes) or None)
        train_file, test_file, unl_file = paths["train"], paths["test"], paths["unlabelled"]
    else:
        train_file, test_file, unl_file = cfg.train_file, cfg.test_file, cfg.unlabelled_file
    train = C.read_conversations(train_file)
    test = C.read_conversations(test_file)
    unlabelled = C.read_conversations(unl_file, labelled=False) if unl_file else []
    if cfg.tools_file is not None:  # the user's tools, offered where a conversation names none
        train, test, unlabelled = (_offered(x, tools.schemas) for x in (train, test, unlabelled))
    if cfg.unlabelled_limit is not None:
        unlabelled = unlabelled[: cfg.unlabelled_limit]
    if cfg.test_limit is not None:
        test = test[: cfg.test_limit]
    order = np.random.default_rng([cfg.data_seed, 17]).permutation(len(train))
    labelled = [train[i] for i in order[: cfg.labelled_subset]] if cfg.labelled_subset else train
    tok_dir = run_dir / "tokenizer"
    if cfg.teacher_dir is not None:
        tokenizer = Tokenizer.from_folder(cfg.teacher_dir)
    elif (tok_dir / "tokenizer.json").exists():
        tokenizer = Tokenizer.from_folder(tok_dir)
    else:
        from jkd.data.tokenizer import byte_tokenizer

        plain = byte_tokenizer()
        tokenizer = train_bpe_tokenizer([render_chat(plain, c["messages"]) for c in train], vocab_size=cfg.vocab_size)
    counts = {"train": len(train), "labelled_subset": len(labelled), "test": len(test), "unlabelled": len(unlabelled)}
    echo(
        f"conversations: {len(train)} labelled for the teacher, {len(labelled)} for the students, "
        f"{len(unlabelled)} unlabelled requests, {len(test)} test"
    )
    return _Data(tokenizer, train, labelled, test, unlabelled, counts)


def _batches(ids, learn, *, cfg: LMExperimentConfig, pad_id: int, seed: int, prompts: int | None):
    """Batches for the fit loop and the number of them in an epoch. With ``cfg.pack_length``,
    ``batch_size`` rows of packed conversations (:func:`jkd.data.conversations.packed_batches`);
    with ``prompts`` (on-policy) each row also carries its prompt: the tokens before its first
    learned token, in ``prompts`` right-padded slots. On-policy rows are never packed (a row is
    one prompt to continue): under packing they take as many token slots as a packed batch,
    ``batch_size * pack_length // max_length`` rows of ``max_length``."""
    if cfg.pack_length is not None and prompts is None:
        rows, length = cfg.batch_size, cfg.pack_length
        per_epoch = len(C.pack_plan([len(x) for x in ids], rows=rows, length=length, seed=seed, epoch=0))

        def packed(start):
            return C.packed_batches(ids, learn, rows=rows, length=length, pad_id=pad_id, seed=seed, start=start)

        return packed, per_epoch
    rows = cfg.batch_size if cfg.pack_length is None else max(cfg.batch_size * cfg.pack_length // cfg.max_length, 1)

    def stream(start):
        for b in C.sequence_batches(
            ids, learn, batch_size=rows, length=cfg.max_length, pad_id=pad_id, seed=seed, start=start
        ):
            if prompts is not None:
                b = dict(b)
                first = np.argmax(b["loss_mask"], axis=1)
                lengths = np.clip(first, 1, prompts).astype(np.int32)
                j = np.arange(prompts)[None]
                b["prompt_tokens"] = np.where(j < lengths[:, None], b["tokens"][:, :prompts], pad_id).astype(np.int32)
                b["prompt_lengths"] = lengths
            yield b

    return stream, max(len(ids) // rows, 1)


# ---- training ---------------------------------------------------------------------------------------


class LMJob(Job):
    """The language-model job's parts for the skeleton (:mod:`jkd.jobs.skeleton`): conversations
    and a tokenizer, a decoder teacher and students (Hugging Face folders), agent metrics per
    seed, its report rows, figures and samples."""

    teacher_marker = "config.json"

    @property
    def cfg(self) -> LMExperimentConfig:
        return self.config

    def guarded_inputs(self) -> dict:
        return guarded_inputs(self.config)

    def reusable(self) -> tuple[str, ...]:
        return evaluation_keys(self.config)

    def prepare(self, run: Run) -> None:
        cfg, echo = self.config, self.echo

        # the tools the agent loop runs: the user's module (its schemas checked now), or the
        # simulated tools of the embedded data
        self.tools = (
            Toolbox.from_file(cfg.tools_file, timeout_s=cfg.tool_timeout)
            if cfg.tools_file
            else toolchat.simulated_tools()
            if cfg.train_file is None
            else None
        )
        if cfg.tools_file:
            echo(f"tools: {', '.join(self.tools.names)} from {cfg.tools_file} (stopped after {cfg.tool_timeout:g} s)")

        def read():
            if cfg.train_file is None:
                run.folder.begin()  # the embedded conversations are written into the run folder
            data = _read_data(cfg, run.path, echo, self.tools)  # a user's files are read and checked first
            if cfg.teacher_dir is None:  # a tokenizer trained here, written for the other processes
                run.folder.begin()
                if run.primary and not (run.path / "tokenizer" / "tokenizer.json").exists():
                    data.tokenizer.save(run.path / "tokenizer")
            return data

        # several processes: process 0 writes the embedded data and the tokenizer, the others read them
        self.data = data = hosts.primary_first(read, "jkd: conversations and tokenizer prepared")
        tok = data.tokenizer
        self.pad_id = tok.pad_id if tok.pad_id is not None else 0
        self.eos_id = tok.eos_id
        self.raw = {split: getattr(data, split) for split in ("train", "labelled", "test", "unlabelled")}
        self.view = view = self._view(tok, "the teacher")  # what the teacher and the students of its tokenizer read
        for split in ("train", "labelled", "test", "unlabelled"):
            setattr(data, split, getattr(view, split))
        self.tool_format, self.tool_format_line = view.tool_format, view.tool_format_line
        self.train_enc, self.labelled_enc, self.test_enc = view.train_enc, view.labelled_enc, view.test_enc
        # students of another tokenizer (their own folders) read the conversations through it
        self.views = {s.name: self._view(own, s.name) for s in cfg.students if (own := self._own_tokenizer(s))}
        # whole tasks in the loop need tools to run the model's calls
        self.test_tasks = tasks_from(data.test) if self.tools is not None else []
        turns = C.assistant_turns(tok, data.test)
        self.test_turns = self._common_turns(turns)
        self.skipped_turns = len(turns) - len(self.test_turns)  # prompts longer than max_length (for any tokenizer)
        requests = C.request_prompts(tok, data.unlabelled) if data.unlabelled else []
        kept = [i for i, p in enumerate(requests) if len(p) < cfg.max_length]  # room for an answer
        self.request_prompts = [requests[i] for i in kept]
        self.request_conversations = [data.unlabelled[i] for i in kept]
        self.skipped_requests = len(requests) - len(kept)
        # generation: a measured prompt (at most max_length tokens, padded to its bucket) plus the new tokens
        self.positions_needed = bucket_length(cfg.max_length, BUCKETS) + cfg.max_new_tokens
        self._check_inputs(turns)
        # jitted steps by what they close over: groups that differ only in data, seeds' values or
        # initialisation (a student alone, from the teacher's layers, on the teacher's answers)
        # share one compilation
        self._runs: dict = {}
        self.answered = None
        self.teacher_texts = None
        self.samples: dict[str, list[str]] = {}
        self._stored: dict[tuple[int, int], StoredTopK] = {}  # (k, vocab) -> the teacher's stored top-k
        self._crossed: dict[tuple, _Cross] = {}  # a cross-tokenizer setting's aligned rows
        kernels = {self.attention_kernel(cfg.dtype), self.attention_kernel(cfg.teacher_dtype)}
        self.echo("attention: " + ", ".join(sorted((k or BlockedAttention()).description for k in kernels)))
        self.plan_memory()  # a plan that does not fit is refused here, before the folder is written
        run.folder.begin()

    def _view(self, tok: Tokenizer, who: str) -> "_View":
        """The run's conversations as one tokenizer reads them: its tool-call format, the
        conversations as its template takes them, their encodings and the test tasks."""
        cfg = self.cfg
        raw = self.raw
        fmt, how, warning = tool_format_for(tok, cfg.tool_format, raw["train"] + raw["test"])
        splits = {k: [fmt.prepare(c) for c in v] if fmt.arguments_as_string else v for k, v in raw.items()}
        line = f"tool calls read in the {fmt.name} format ({how})"
        if who != "the teacher":
            line = f"{who}: " + line
        self.echo(line)
        if warning is not None:
            self.echo("warning: " + warning)
            line += f"; warning: {warning}"
        enc = lambda convs: C.encode_conversations(tok, convs, max_length=cfg.max_length)  # noqa: E731
        return _View(
            tok,
            tok.pad_id if tok.pad_id is not None else 0,
            tok.eos_id,
            fmt,
            line,
            **splits,
            encode=enc,
            labelled_enc=enc(splits["labelled"]),
            test_enc=enc(splits["test"]),
            test_tasks=tasks_from(splits["test"]) if self.tools is not None else [],
        )

    def _own_tokenizer(self, student: LMStudent) -> Tokenizer | None:
        """The tokenizer of a student folder when it is not the teacher's (None otherwise)."""
        if student.from_dir is None or not (Path(student.from_dir) / "tokenizer.json").exists():
            return None
        own = Tokenizer.from_folder(student.from_dir)
        if same_tokens(own, self.data.tokenizer):
            return None
        needs = [d.name for d in self.cfg.distillations if not _across_tokenizers(d.objective)]
        if needs:
            raise VocabularyMismatchError(
                f"the student in {student.from_dir} has its own tokenizer ({own.vocab_size} tokens; the teacher's has "
                f"{self.data.tokenizer.vocab_size}), and {', '.join(needs)} compare the two models token by token over "
                "one vocabulary. Across tokenizers choose a cross-tokenizer loss: --cross-tokenizer uld (the sorted "
                "probabilities of every span) or --cross-tokenizer hybrid (--loss on the spans that are one token with "
                "the same string in both, ULD elsewhere); --mode sequence with --kd-weight 0 trains on the teacher's "
                "answers as text."
            )
        self.echo(
            f"{student.name}: its own tokenizer ({own.vocab_size} tokens; the teacher's has "
            f"{self.data.tokenizer.vocab_size}): distilled across tokenizers"
        )
        return own

    def _common_turns(self, turns: list) -> list:
        """The test turns every model measures: those whose prompt fits ``max_length`` in every
        tokenizer of the run (each view keeps its own encoding of them, in the same order)."""
        cfg = self.cfg
        key = lambda t: (t.conversation, len(t.context))  # noqa: E731
        per_view = {
            id(v): [
                t
                for t in (turns if v is self.view else C.assistant_turns(v.tokenizer, v.test))
                if len(t.prompt) <= cfg.max_length
            ]
            for v in (self.view, *self.views.values())
        }
        common = set.intersection(*({key(t) for t in kept} for kept in per_view.values()))
        for v in (self.view, *self.views.values()):
            v.test_turns = [t for t in per_view[id(v)] if key(t) in common]
        return self.view.test_turns

    def _check_inputs(self, turns: list) -> None:
        """Refuse, before any training, what would stop the run after it: no test turn to measure,
        too few conversations for a batch, a teacher whose positions cannot hold the sequences."""
        cfg, data = self.cfg, self.data
        test_name = cfg.test_file or "the embedded test conversations"
        if not self.test_turns:
            shortest = min((len(t.prompt) for t in turns), default=None)
            raise ValueError(
                f"no test turn to measure: the prompts before all {len(turns)} assistant turns of "
                f"{test_name} are longer "
                f"than --max-length {cfg.max_length}"
                + (f" (the shortest has {shortest} tokens)" if shortest else "")
                + "; raise --max-length or give shorter test conversations."
            )
        on_policy = any(isinstance(d.objective, OnPolicyKD) for d in cfg.distillations)
        rows = (
            cfg.batch_size
            if cfg.pack_length is None
            else max(cfg.batch_size * cfg.pack_length // cfg.max_length, 1)
            if on_policy
            else 1
        )
        trained_here = teacher_source(cfg.teacher_dir, self.folder, complete="config.json") is None
        for what, enc, convs in [("for the students", self.labelled_enc, data.labelled)] + (
            [("for the teacher", self.train_enc, data.train)] if trained_here else []
        ):
            if len(enc) >= rows:
                continue
            train_name = cfg.train_file or "the embedded conversations"
            if enc.dropped:
                need = f"; the shortest of them needs {enc.shortest_dropped} tokens" if enc.shortest_dropped else ""
                raise ValueError(
                    f"{enc.dropped} of the {len(convs)} conversations {what} ({train_name}) have no assistant token "
                    f"within --max-length {cfg.max_length} (rule: {C.TRUNCATION_RULE}){need}. {len(enc)} remain, "
                    f"fewer than one batch of {rows}: raise --max-length"
                    + (f" to at least {enc.shortest_dropped}" if enc.shortest_dropped else "")
                    + " or lower --batch-size."
                )
            raise ValueError(
                f"{len(enc)} conversations {what} ({train_name}) do not fill one batch of {rows}; lower --batch-size."
            )
        for enc in (self.labelled_enc, self.test_enc):
            if enc.dropped:
                self.echo(
                    f"note: {enc.dropped} conversations have no assistant token within --max-length "
                    f"{cfg.max_length} and are left out (rule: {C.TRUNCATION_RULE})"
                )
        if cfg.teacher_dir is not None:
            positions = read_config(cfg.teacher_dir).max_position_embeddings
            where = f"the teacher's max_position_embeddings ({positions}, in {Path(cfg.teacher_dir) / 'config.json'})"
            if cfg.max_length > positions:
                raise ValueError(
                    f"--max-length {cfg.max_length} exceeds {where}: the teacher was not made for "
                    f"sequences that long. Lower --max-length to at most {positions}."
                )
            if self.positions_needed > positions:
                raise ValueError(
                    f"measuring needs {self.positions_needed} positions (test prompts of up to "
                    f"{cfg.max_length} tokens, padded to {self.positions_needed - cfg.max_new_tokens}, plus "
                    f"--max-new-tokens {cfg.max_new_tokens}), more than {where}. Lower --max-new-tokens or "
                    "--max-length."
                )

    def attention_kernel(self, dtype: str | None):
        """The whole-sequence attention kernel for passes in ``dtype`` (None: float32); None stands
        for the decoder's default, the blocked XLA attention."""
        choice = self.cfg.attention
        shape = self.cfg.mesh_shape()
        devices = (
            1
            if shape is None and jax.process_count() == 1
            else jax.device_count()
            if shape is None
            else shape[0] * shape[1]
        )
        kernel = (
            ATTENTION[choice] if choice else for_backend(jax.default_backend(), DTYPES[dtype or "float32"], devices)
        )
        return None if kernel == BlockedAttention() else kernel

    def _prepared(self, model: Decoder) -> Decoder:
        """A student as it trains: remat and the attention kernel of the run's settings."""
        return set_attention(set_remat(model, bool(self.cfg.remat)), self.attention_kernel(self.cfg.dtype))

    def with_vocab(self, config: DecoderConfig) -> DecoderConfig:
        slots = max(config.max_position_embeddings, self.positions_needed)
        return dataclasses.replace(
            config,
            vocab_size=self.data.tokenizer.vocab_size,
            eos_token_id=self.eos_id,
            pad_token_id=self.pad_id,
            max_position_embeddings=slots,
        )

    def _group(
        self,
        config: DecoderConfig,
        objective,
        *,
        ids,
        learn,
        steps: int,
        seeds,
        optimizer: AdamWConfig,
        teacher_graphdef=None,
        on_policy_prompts: int | None = None,
        stored: StoredTopK | None = None,
        rows_only: bool = False,
        rollout: Callable | None = None,
        quant: str | None = None,
        pad_id: int | None = None,
        cross: _Cross | None = None,
    ):
        """The parts of one group's training: ``(graphdef, tx, run, batches)``. ``run`` is the
        jitted vmapped step, one per distinct setting (shared by the memory plan and the training,
        so the step compiled for the plan is the one that trains); ``batches(start)`` yields the
        seeds' batches side by side, ``[B, K, ...]``. ``rows_only``: the rows without their prompts
        (a token-KD step on on-policy rows); ``rollout(state, step, given) -> batch``: each step's
        batch made from the state that trains it (the student's trajectories through the tools).
        ``pad_id``: the student's (None: the teacher's tokenizer's). ``cross``: a cross-tokenizer
        group's aligned rows (they replace ``ids`` and ``learn``) and shared tokens."""
        cfg = self.cfg
        rows_only = rows_only or rollout is not None
        pad_id = self.pad_id if pad_id is None else pad_id
        if cross is not None:
            ids, learn = cross.aligned.student_ids, cross.aligned.student_learn
        streams = [_batches(ids, learn, cfg=cfg, pad_id=pad_id, seed=s, prompts=on_policy_prompts) for s in seeds]
        per_epoch, streams = streams[0][1], [s[0] for s in streams]
        if stored is not None:  # each row checked against what was stored for it
            streams = [functools.partial(lambda start, f: with_teacher_targets(f(start), stored), f=f) for f in streams]
        if cross is not None:  # each row with the teacher's tokens of its text and the spans
            streams = [
                functools.partial(
                    lambda start, f: with_spans(
                        f(start), cross.aligned, teacher_length=cfg.max_length, teacher_pad_id=self.pad_id
                    ),
                    f=f,
                )
                for f in streams
            ]
        graphdef = split_model(nnx.eval_shape(lambda: self._prepared(Decoder(config, rngs=nnx.Rngs(0)))))[0]
        kind = (
            on_policy_step
            if isinstance(objective, OnPolicyKD)
            else stored_topk_step
            if isinstance(objective, StoredTopKKD)
            else cross_tokenizer_step
            if isinstance(objective, CrossTokenizerKD)
            else token_kd_step
        )
        key = (graphdef, teacher_graphdef, optimizer, per_epoch, steps, kind, quant, cross and cross.name)
        if key not in self._runs:
            tx = make_optimizer(optimizer, steps_per_epoch=per_epoch, total_steps=steps)
            step = functools.partial(
                kind,
                graphdef=graphdef,
                teacher_graphdef=teacher_graphdef,
                tx=tx,
                compute_dtype=DTYPES[cfg.dtype] if cfg.dtype == "bfloat16" else None,
                quant=quant,
            )
            if kind is cross_tokenizer_step:  # the tokens both vocabularies hold, bound to the step
                step = functools.partial(step, shared=cross.shared)
            if kind is token_kd_step and (cfg.micro_batches or 1) > 1:
                step = functools.partial(step, micro_batches=cfg.micro_batches)
            # batches [B, K, ...]: column k is seed k's batch (parallel.batch_size counts B rows)
            self._runs[key] = tx, self.run.runner(jax.vmap(step, in_axes=(0, 1, None, None)), shardings=tree_shardings)
        tx, run = self._runs[key]
        local = getattr(run, "local_rows", None)  # several processes: each feeds its rows of the batch

        def local_rows(batch):
            return batch if local is None else {k: v[local(len(v))] for k, v in batch.items()}

        def batches(start):
            for step, bs in enumerate(zip(*(stream(start) for stream in streams)), start):
                if rows_only:
                    bs = [{k: b[k] for k in ("tokens", "loss_mask", "attention_mask")} for b in bs]
                if rollout is not None:  # made when the step runs, from its state
                    yield lambda state, step=step, bs=bs: local_rows(rollout(state, step, bs))
                    continue
                yield local_rows({k: np.stack([b[k] for b in bs], axis=1) for k in bs[0]})

        return graphdef, tx, run, batches

    def train_students(
        self,
        name: str,
        config: DecoderConfig,
        objective,
        *,
        ids,
        learn,
        steps: int,
        seeds,
        optimizer: AdamWConfig,
        teacher=None,
        on_policy_prompts: int | None = None,
        init: Decoder | None = None,
        stored: StoredTopK | None = None,
        through_tools: OnPolicyKD | None = None,
        quant: str | None = None,
        pad_id: int | None = None,
        cross: _Cross | None = None,
    ):
        """Train ``len(seeds)`` students of ``config`` in one vmapped step, each seed with its own
        initialisation (or all from ``init``) and its own data order; returns ``(graphdef, [params])``.
        ``stored``: the teacher's top-k outputs for the rows ``ids``, attached to every batch.
        ``through_tools``: on-policy through the tools with this objective (``objective`` is then
        its token-KD step's). ``quant``: the passes see the weights as that GGUF type holds them.
        ``pad_id``, ``cross``: as :meth:`_group`."""
        cfg = self.cfg
        tg, tvars = teacher if teacher is not None else (None, None)
        rollout, tally = None, collections.Counter()
        if through_tools is not None:
            rollout = functools.partial(
                self._rollout_batch,
                objective=through_tools,
                seeds=tuple(seeds),
                graphdef=lambda: graphdef,
                tally=tally,
                quant=quant,
            )
        graphdef, tx, run, batches = self._group(
            config,
            objective,
            ids=ids,
            learn=learn,
            steps=steps,
            seeds=seeds,
            optimizer=optimizer,
            teacher_graphdef=tg,
            on_policy_prompts=on_policy_prompts,
            stored=stored,
            rollout=rollout,
            quant=quant,
            pad_id=pad_id,
            cross=cross,
        )
        model = (lambda s: init) if init is not None else (lambda s: Decoder(config, rngs=nnx.Rngs(s)))
        models = [self._prepared(model(s)) for s in seeds]
        states = stack_states([create_train_state(m, tx, seed=s)[1] for m, s in zip(models, seeds)])
        states = self.run.train_group(
            name,
            run,
            states,
            objective,
            tvars,
            batches=batches,
            config=LoopConfig(
                num_steps=steps,
                save_every=max(steps // 4, 1),
                progress=self.progress,
                label=name,
                sync_every=5,
                unit="seq" if cfg.pack_length is None or on_policy_prompts else "row",
            ),
        )
        if tally:  # what the students' trajectories did with the tools (this run's steps: not those resumed past)
            calls, failed = (
                sum(tally[k] for k in (OK, REFUSED, RAISED, TIMED_OUT)),
                tool_failures(tally, cfg.tool_timeout),
            )
            self.echo(
                f"{name}: {tally['steps']} steps played {tally['trajectories']} trajectories through the tools, "
                f"{tally['calls_made']} of them calling tools; of {calls} tool calls, "
                + (f"{failed}, each answered by the student from the error" if failed else "none failed")
            )
        params = hosts.gathered(states.params)  # whole on every process: saved and measured there
        return graphdef, [jax.tree.map(lambda x, i=i: x[i], params) for i in range(len(seeds))]

    # ---- the teacher -------------------------------------------------------------------------------

    def _teacher(self, model: Decoder) -> Trained:
        # a teacher trained here in float32 runs as teacher_dtype from now on
        self.teacher_model = model = _in_dtype(model, DTYPES[self.cfg.teacher_dtype or "float32"])
        set_attention(model, self.attention_kernel(self.cfg.teacher_dtype))
        self.frozen_teacher = tg, tvars = freeze_model(model)
        self._teacher_identity = None  # hashed once, on first use (every teacher weight is read)
        loss = "(loaded, not trained here)" if self.cfg.teacher_dir else "cross-entropy (all labelled)"
        return Trained(
            "teacher",
            "teacher",
            loss,
            tg,
            [tvars.params],
            model.config,
            {"student": None, "initialisation": "random", "teacher_signal": False},
        )

    def _local_mesh(self):
        """The run's mesh when it has one and runs as one process (the teacher is then loaded onto
        it and answers there); None otherwise."""
        shape = self.cfg.mesh_shape()
        if shape is None or jax.process_count() > 1:
            return None
        return make_mesh(*shape, devices=jax.devices()[: shape[0] * shape[1]])

    def _answering(self, teacher: Decoder) -> Decoder:
        """The teacher that answers the requests: on the run's mesh when it has one (its matrices
        split as in training, so each device holds a share), in a run of one process; else as it is."""
        mesh = self._local_mesh()
        if mesh is None:
            return teacher
        graphdef, state = nnx.split(teacher)  # a loaded teacher is on the mesh already: nothing is copied
        return nnx.merge(graphdef, jax.device_put(state, tree_shardings(state, mesh)))

    def load_teacher(self, run: Run, source: Path) -> Trained:
        # each tensor straight to its devices, in the teacher's dtype
        teacher = load_hf(source, dtype=DTYPES[self.cfg.teacher_dtype or "float32"], mesh=self._local_mesh())
        self.echo(f"teacher: loaded from {source}")
        if self.cfg.teacher_dir is None and teacher.config.max_position_embeddings < self.positions_needed:
            # this run's own teacher, measured now with longer answers: its rotary positions have no
            # table, so the limit it was saved with is raised (a given teacher was checked instead)
            teacher.config = dataclasses.replace(teacher.config, max_position_embeddings=self.positions_needed)
        return self._teacher(teacher)

    def train_teacher(self, run: Run) -> Trained:
        cfg = self.cfg
        self.echo(f"teacher: training {cfg.teacher_steps} steps on {len(self.train_enc)} conversations")
        g, params = self.train_students(
            "teacher",
            self.with_vocab(cfg.teacher),
            TokenKD(kd_weight=0.0, ce_weight=1.0),
            ids=self.train_enc.ids,
            learn=self.train_enc.learn,
            steps=cfg.teacher_steps,
            seeds=(0,),
            optimizer=cfg.teacher_optimizer,
        )
        self.trained_teacher = _as_decoder(g, params[0])  # saved as trained (float32)
        return self._teacher(self.trained_teacher)

    def save_teacher(self, run: Run, teacher: Trained, path: Path) -> None:
        if run.primary:
            save_hf(self.trained_teacher, path, tokenizer=self.data.tokenizer, overwrite=True)

    # ---- the students ------------------------------------------------------------------------------

    def students(self, run: Run, teacher_entry: Trained) -> Iterator[Trained]:
        cfg, echo, data = self.cfg, self.echo, self.data
        teacher, (tg, tvars) = self.teacher_model, self.frozen_teacher
        for student in cfg.students:
            init, start = None, "random"
            if student.teacher_layers is not None:  # master weights in float32 whatever the teacher's dtype
                init = _in_dtype(select_layers(teacher, student.teacher_layers), jnp.float32)
                start = "teacher layers"
                if student.width is not None:
                    init, start = self._pruned(init, student.width), "teacher layers, pruned"
                scfg = init.config
            elif student.from_dir is not None:
                init, start = self._student_folder(student), "student folder"
                scfg = init.config
            else:
                scfg = self.with_vocab(student.config)
            view = self.views.get(student.name, self.view)  # a student of its own tokenizer reads through it
            # one tokenizer (the teacher's); the rows may still differ by padding (Qwen's 151,936 vs 152,064)
            vocab = (
                scfg.vocab_size
                if view is not self.view
                else shared_vocabulary(
                    data.tokenizer, data.tokenizer, teacher_rows=teacher.config.vocab_size, student_rows=scfg.vocab_size
                )
            )
            for group in _groups(cfg, student, vocab, scfg.vocab_size):
                name, role, loss_name, objective = group.name, group.role, group.loss, group.objective
                with_answers, through = group.with_answers, group.through_tools
                labelled = view.train_enc if group.all_labels else view.labelled_enc
                ids, learn = list(labelled.ids), list(labelled.learn)
                on_policy = isinstance(objective, OnPolicyKD)
                through = through and self._through_tools(name)
                answered = []  # the teacher's answered requests, as conversations
                if (with_answers or on_policy) and self.request_prompts:
                    if self.answered is None:
                        self.answered = _answered(self, self._answering(teacher), echo)
                    answered = self.answered[2]
                    more = (
                        self.answered[:2] if view is self.view else _encoded(view, answered, max_length=cfg.max_length)
                    )
                    ids, learn = ids + list(more[0]), learn + list(more[1])
                cross = stored = None
                if isinstance(objective, CrossTokenizerKD):
                    cross = self._cross_rows(view, student.name, all_labels=group.all_labels, answered=answered)
                    ids = cross.aligned.student_ids
                    if objective.stored and objective.kd_weight > 0:
                        k = min(scfg.vocab_size, teacher.config.vocab_size)  # the student's gradient stays exact
                        stored = self.stored_spans(cross, objective, k=k, pad_id=view.pad_id)
                elif isinstance(objective, StoredTopKKD) and objective.kd_weight > 0:
                    stored = self.stored_topk(objective.top_k, vocab)
                echo(
                    f"{name}: "
                    + (f"{len(cfg.seeds)} seeds in one vmapped step" if len(cfg.seeds) > 1 else "one seed")
                    + f", {cfg.student_steps} steps "
                    f"on {len(ids)} sequences"
                )
                online = role == "distilled" and (
                    on_policy
                    or (
                        isinstance(objective, (TokenKD, CrossTokenizerKD))
                        and objective.kd_weight > 0
                        and stored is None
                    )
                )
                same_start = role == "distilled" or start == "student folder"  # the alone: random, or the folder's
                g, params = self.train_students(
                    name,
                    scfg,
                    objective.token_kd() if through else objective,
                    ids=ids,
                    learn=learn,
                    steps=cfg.student_steps,
                    seeds=cfg.seeds,
                    optimizer=cfg.student_optimizer,
                    teacher=(tg, tvars) if online else None,
                    on_policy_prompts=_prompt_slots(self) if on_policy else None,
                    init=init if same_start else None,
                    stored=stored,
                    through_tools=objective if through else None,
                    quant=group.quantize,
                    pad_id=view.pad_id,
                    cross=cross,
                )
                info = {
                    "student": student.name,
                    "initialisation": start if same_start else "random",
                    "teacher_signal": online or stored is not None or bool(with_answers),
                    "all_labels": group.all_labels,
                }
                if cross is not None:
                    info["cross_tokenizer"] = cross.describe(objective)
                if group.quantize:  # measured as the GGUF file holds it (the float masters go to the checkpoints)
                    params = [read_back_weights(p, group.quantize) for p in params]
                    info["quantization"] = f"{group.quantize}, trained for it"
                yield Trained(name, role, loss_name, g, params, scfg, info)
                if cfg.ptq and not group.quantize:  # the same weights quantized after training
                    yield Trained(
                        f"{name} · {cfg.ptq}",
                        role,
                        loss_name,
                        g,
                        [read_back_weights(p, cfg.ptq) for p in params],
                        scfg,
                        {**info, "quantization": f"{cfg.ptq}, after training"},
                    )

    def _cross_rows(self, view: _View, name: str, *, all_labels: bool, answered: list[dict]) -> _Cross:
        """The labelled conversations (and ``answered``, the teacher's answered requests) tokenized
        by the teacher and by the student of ``view`` and aligned (:func:`jkd.data.align.aligned_rows`),
        with the tokens both vocabularies hold; kept per setting."""
        key = (name, all_labels, len(answered))
        if key not in self._crossed:
            split = "train" if all_labels else "labelled"
            t_convs = getattr(self.view, split) + answered
            s_convs = getattr(view, split) + _prepared_for(view, answered)
            t0 = time.perf_counter()
            aligned = aligned_rows(
                self.data.tokenizer,
                view.tokenizer,
                s_convs,
                teacher_conversations=t_convs,
                max_length=self.cfg.max_length,
            )
            shared = shared_tokens(
                self.data.tokenizer.backend.get_vocab(with_added_tokens=True),
                view.tokenizer.backend.get_vocab(with_added_tokens=True),
            )
            self._crossed[key] = cross = _Cross(aligned, shared, name)
            self.echo(
                f"{name}: {len(aligned)} conversations tokenized by both models and aligned "
                f"({time.perf_counter() - t0:.0f} s): {cross.describe()}"
            )
        return self._crossed[key]

    def _through_tools(self, name: str, *, quiet: bool = False) -> bool:
        """Whether group ``name``'s on-policy samples go through the tools: it needs tools to run the
        calls and requests to start from (otherwise its samples are single turns, and it says so)."""
        ok = self.tools is not None and bool(self.request_conversations)
        if not ok and not quiet:
            self.echo(
                f"{name}: no {'tools' if self.tools is None else 'unlabelled requests'} to play trajectories "
                "through; its on-policy samples are single turns"
            )
        return ok

    def _rollout_batch(
        self,
        state,
        step: int,
        given: list[dict],
        *,
        objective: OnPolicyKD,
        seeds: tuple[int, ...],
        graphdef,
        tally: collections.Counter | None = None,
        quant: str | None = None,
    ) -> dict[str, np.ndarray]:
        """Step ``step``'s batch ``[B, K, T]`` of an on-policy group through the tools: for each seed,
        with probability ``student_fraction`` (drawn from the seed and the step), the trajectories
        of ``B`` requests played by that seed's student of this step (sampled per
        ``objective.sampling``, each turn's key from the seed, the step and the turn: a resumed run
        plays the same), else its given rows. ``tally`` counts the steps, the trajectories and the
        tool calls' statuses."""
        cfg, tok = self.cfg, self.data.tokenizer
        columns = []
        for k, seed in enumerate(seeds):
            if np.random.default_rng([seed, 31, step]).random() >= objective.student_fraction:
                columns.append(given[k])
                continue
            params = jax.tree.map(lambda x: x[k], state.params)
            model = _as_decoder(graphdef(), params if quant is None else read_back_weights(params, quant))
            n, rows = len(self.request_conversations), len(given[k]["tokens"])
            epoch, at = divmod(step * rows, n)
            order = np.random.default_rng([seed, 37, epoch]).permutation(n)
            picks = [order[(at + i) % n] for i in range(rows)]
            tasks = [
                Task(self.request_conversations[i]["messages"], self.request_conversations[i].get("tools"), [], "")
                for i in picks
            ]
            turns = iter(range(cfg.max_turns))

            def play(prompts, model=model, seed=seed, turns=turns):
                key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), step), next(turns))
                return generate(
                    model,
                    prompts,
                    max_new_tokens=objective.max_new_tokens,
                    sampling=objective.sampling,
                    key=key,
                    buckets=BUCKETS,
                ).rows()

            trajectories = run_tasks(
                play,
                tok,
                tasks,
                tools=self.tools,
                tool_format=self.tool_format,
                max_turns=cfg.max_turns,
                max_length=cfg.max_length,
            )
            if tally is not None:
                tally.update(trajectories=len(trajectories), calls_made=sum(bool(t.calls) for t in trajectories))
                tally.update(st for t in trajectories for st in t.statuses)
            ids, learn = trajectory_rows(tok, tasks, trajectories, max_length=cfg.max_length)
            columns.append(C.padded_rows(ids, learn, length=given[k]["tokens"].shape[1], pad_id=self.pad_id))
        if tally is not None:
            tally["steps"] += 1
        return {key: np.stack([c[key] for c in columns], axis=1) for key in ("tokens", "loss_mask", "attention_mask")}

    def _pruned(self, model: Decoder, width: tuple[int | None, int | None]) -> Decoder:
        """``model`` narrowed to ``width`` by activation importance on the first labelled batch."""
        n = min(self.cfg.batch_size, len(self.labelled_enc.ids))
        rows = C.padded_rows(
            self.labelled_enc.ids[:n], self.labelled_enc.learn[:n], length=self.cfg.max_length, pad_id=self.pad_id
        )
        importance = width_importance(model, rows["tokens"], attention_mask=rows["attention_mask"])
        small = prune_width(model, importance, intermediate_size=width[0], num_kv_heads=width[1])
        self.echo(
            f"width pruned by activation importance on {n} conversations: MLP {model.config.intermediate_size} -> "
            f"{small.config.intermediate_size} channels, key/value heads {model.config.num_kv_heads} -> "
            f"{small.config.num_kv_heads} (query heads {model.config.num_heads} -> {small.config.num_heads})"
        )
        return small

    def _student_folder(self, student: LMStudent) -> Decoder:
        """The student of ``student.from_dir``, weights and all (checked by :meth:`_check_student_folder`)."""
        model = load_hf(student.from_dir, mesh=self._local_mesh())
        own = self.views[student.name].tokenizer if student.name in self.views else None
        self._check_student_folder(Path(student.from_dir), model.config, self.teacher_model.config.vocab_size, own)
        return model

    def _check_student_folder(
        self, folder: Path, config: DecoderConfig, teacher_rows: int, own: Tokenizer | None = None
    ) -> None:
        """A student folder's vocabulary against the run's tokenizer (or ``own``, its tokenizer when
        it is not the teacher's), and its positions against the run's."""
        tok = self.data.tokenizer
        if own is not None:
            shared_vocabulary(own, own, teacher_rows=config.vocab_size, student_rows=config.vocab_size)  # its rows
        elif (folder / "tokenizer.json").exists():
            shared_vocabulary(
                tok, Tokenizer.from_folder(folder), teacher_rows=teacher_rows, student_rows=config.vocab_size
            )  # one tokenizer: the same ids
        elif config.vocab_size < tok.vocab_size:
            raise ValueError(
                f"the student in {folder} has {config.vocab_size} vocabulary rows but the "
                f"tokenizer has {tok.vocab_size} tokens; give a student of this tokenizer."
            )
        if config.max_position_embeddings < self.positions_needed:
            raise ValueError(
                f"the student in {folder} holds {config.max_position_embeddings} positions; the run "
                f"needs {self.positions_needed} (--max-length plus --max-new-tokens)."
            )

    # ---- the memory plan ---------------------------------------------------------------------------

    def plan_memory(self) -> list[MP.StepMemory]:
        """Compile every distinct training step of the run for the shapes it will run with (from
        the configs: no weights are read) and print what each holds per device, from XLA's memory
        analysis; refuse (:class:`~jkd.train.memory_plan.MemoryPlanError`) a step whose peak is
        above ``memory_limit_gib`` or the device's memory, with the flags that make it fit, found by
        compiling it again with each in turn. The steps compiled here are the ones that train."""
        cfg = self.cfg
        steps = self._planned_steps()
        plans = [p for p in (plan() for plan in steps.values()) if p is not None]
        if not plans:
            return plans
        limit, source = (
            (int(cfg.memory_limit_gib * MP.GiB), "--memory-limit-gib")
            if cfg.memory_limit_gib
            else (MP.device_memory(), "the device's memory, as JAX reports it")
        )
        if limit is None:
            source = "the backend does not report its devices' memory; set --memory-limit-gib to check against one"
        self.echo(MP.format_plan(plans, limit=limit, limit_source=source))

        def replan(name: str, flags: list[str]) -> MP.StepMemory | None:
            changes = {}
            for flag in flags:
                changes.update(self._remedies()[flag])
            try:  # the step compiled again under the changed settings
                self.config = dataclasses.replace(cfg, **changes)
                return self._planned_steps()[name]()
            finally:
                self.config = cfg

        MP.refuse_if_too_large(plans, limit=limit, limit_source=source, remedies=list(self._remedies()), replan=replan)
        return plans

    def _planned_steps(self) -> dict[str, Callable[[], MP.StepMemory | None]]:
        """Every group's step by name, as a function that compiles it and returns its plan."""
        cfg, tok = self.cfg, self.data.tokenizer
        tcfg = read_config(cfg.teacher_dir) if cfg.teacher_dir else self.with_vocab(cfg.teacher)
        teacher = freeze_model(
            nnx.eval_shape(
                lambda: set_attention(
                    Decoder(tcfg, dtype=DTYPES[cfg.teacher_dtype or "float32"], rngs=nnx.Rngs(0)),
                    self.attention_kernel(cfg.teacher_dtype),
                )
            )
        )
        steps = {}
        if teacher_source(cfg.teacher_dir, self.folder, complete="config.json") is None:
            steps["teacher"] = functools.partial(
                self._plan_step,
                "teacher",
                self.with_vocab(cfg.teacher),
                TokenKD(kd_weight=0.0, ce_weight=1.0),
                ids=self.train_enc.ids,
                learn=self.train_enc.learn,
                steps=cfg.teacher_steps,
                seeds=(0,),
                optimizer=cfg.teacher_optimizer,
                teacher=None,
            )
        for student in cfg.students:
            scfg = (
                student.cut_config(tcfg)
                if student.teacher_layers
                else read_config(student.from_dir)
                if student.from_dir
                else self.with_vocab(student.config)
            )
            view = self.views.get(student.name, self.view)
            if student.from_dir:
                self._check_student_folder(
                    Path(student.from_dir), scfg, tcfg.vocab_size, view.tokenizer if view is not self.view else None
                )
            vocab = (
                scfg.vocab_size
                if view is not self.view
                else shared_vocabulary(tok, tok, teacher_rows=tcfg.vocab_size, student_rows=scfg.vocab_size)
            )
            for group in _groups(cfg, student, vocab, scfg.vocab_size):
                name, role, objective, with_answers = group.name, group.role, group.objective, group.with_answers
                on_policy = isinstance(objective, OnPolicyKD)
                through = group.through_tools and self._through_tools(name, quiet=True)
                online = role == "distilled" and (
                    on_policy
                    or (
                        isinstance(objective, (TokenKD, CrossTokenizerKD))
                        and objective.kd_weight > 0
                        and not getattr(objective, "stored", False)
                    )
                )
                labelled = view.train_enc if group.all_labels else view.labelled_enc
                ids, learn = labelled.ids, labelled.learn
                answers = (with_answers or on_policy) and bool(self.request_prompts)
                if answers:
                    # the teacher's answers are not there yet: one row per request stands in for each (the same
                    # number of rows: unpacked, the same schedule compiles and training reuses the step)
                    ids = list(ids) + [p[: cfg.max_length] for p in self.request_prompts]
                    learn = list(learn) + [np.ones(min(len(p), cfg.max_length), bool) for p in self.request_prompts]
                cross = None
                if isinstance(objective, CrossTokenizerKD):  # the labelled rows aligned, cycled to the same count
                    cross = self._cross_rows(view, student.name, all_labels=group.all_labels, answered=[])
                    cross = _Cross(
                        cross.aligned.cycled(len(ids)) if answers else cross.aligned, cross.shared, cross.name
                    )
                steps[name] = functools.partial(
                    self._plan_step,
                    name,
                    scfg,
                    objective.token_kd() if through else objective,
                    ids=ids,
                    learn=learn,
                    steps=cfg.student_steps,
                    seeds=cfg.seeds,
                    optimizer=cfg.student_optimizer,
                    teacher=teacher if online else None,
                    on_policy_prompts=_prompt_slots(self) if on_policy else None,
                    generated=objective.max_new_tokens if on_policy else None,
                    rows_only=through,
                    quant=group.quantize,
                    pad_id=view.pad_id,
                    cross=cross,
                )
        return steps

    def _remedies(self) -> dict[str, dict]:
        """The settings not in effect that may lower a step's peak (flag -> config changes), in the
        order they are tried: the teacher in bfloat16, micro-batches, remat, bfloat16 passes."""
        cfg, out = self.cfg, {}
        if cfg.teacher_dtype != "bfloat16":
            out["--teacher-dtype bfloat16"] = {"teacher_dtype": "bfloat16"}
        m = cfg.micro_batches or 1
        n = next((k for k in (2, 4, 8, 16) if k > m and cfg.batch_size % k == 0), None)
        if n and all(isinstance(d.objective, TokenKD) for d in cfg.distillations):
            out[f"--micro-batches {n}"] = {"micro_batches": n}
        if not cfg.remat:
            out["--remat"] = {"remat": True}
        if cfg.dtype != "bfloat16":
            out["--dtype bfloat16"] = {"dtype": "bfloat16"}
        return out

    def _plan_step(
        self,
        name,
        config,
        objective,
        *,
        ids,
        learn,
        steps,
        seeds,
        optimizer,
        teacher,
        on_policy_prompts=None,
        generated: int | None = None,
        rows_only: bool = False,
        quant: str | None = None,
        pad_id: int | None = None,
        cross: _Cross | None = None,
    ) -> MP.StepMemory | None:
        tg, tvars = teacher if teacher is not None else (None, None)
        graphdef, tx, run, batches = self._group(
            config,
            objective,
            ids=ids,
            learn=learn,
            steps=steps,
            seeds=seeds,
            optimizer=optimizer,
            teacher_graphdef=tg,
            on_policy_prompts=on_policy_prompts,
            rows_only=rows_only,
            quant=quant,
            pad_id=pad_id,
            cross=cross,
        )
        batch = next(iter(batches(0)))
        rows, k, length = batch["tokens"].shape
        if isinstance(objective, StoredTopKKD) or getattr(objective, "stored", False):  # the stored outputs
            teacher_rows = (
                read_config(self.cfg.teacher_dir) if self.cfg.teacher_dir else self.with_vocab(self.cfg.teacher)
            ).vocab_size
            shape = (rows, k, length - 1, getattr(objective, "top_k", None) or min(config.vocab_size, teacher_rows))
            batch = {**batch, VALUES: np.zeros(shape, jnp.bfloat16), INDICES: np.zeros(shape, np.int32)}
        one = jax.eval_shape(lambda: create_train_state(Decoder(config, rngs=nnx.Rngs(0)), tx, seed=0)[1])
        states = jax.tree.map(lambda x: jax.ShapeDtypeStruct((len(seeds), *x.shape), x.dtype), one)
        layout = getattr(run, "state_sharding", None)
        shard = (
            (lambda tree: layout(tree) if callable(layout) else layout) if layout is not None else (lambda tree: None)
        )
        placed = shard(states)  # the states' shardings: a tree like them, one sharding, or None (one device)
        per_tree = (
            (lambda part: getattr(placed, part))
            if placed is not None and hasattr(placed, "params")
            else (lambda part: placed)
        )
        mesh = self.cfg.mesh_shape() or (1, 1)
        local_rows = -(-rows // mesh[0])
        student = MP.per_device_bytes(states.params, per_tree("params"))
        vocab = getattr(objective, "vocab_size", None) or config.vocab_size
        chunk = getattr(objective, "chunk_size", 1024)
        kv = 0
        if on_policy_prompts is not None:
            kv = MP.kv_cache_bytes(
                layers=config.num_layers,
                rows=local_rows,
                slots=on_policy_prompts + generated,
                kv_heads=-(-config.num_kv_heads // mesh[1]),
                head_dim=config.head_dim,
                seeds=len(seeds),
            )
        return MP.compiled_step_memory(
            run.lower(states, batch, objective, tvars),
            name=name,
            teacher=MP.per_device_bytes(tvars, shard(tvars)) if tvars is not None else 0,
            student=student,
            optimizer=MP.per_device_bytes(states.opt_state, per_tree("opt_state")),
            gradients=student,
            kv_cache=kv,
            loss_chunk=MP.fused_loss_chunk(
                local_rows * (length - 1), chunk, vocab, seeds=len(seeds), with_teacher=tvars is not None
            ),
        )

    @property
    def teacher_identity(self) -> str:
        """The frozen teacher's identity (:func:`jkd.train.stored.teacher_identity`): a hash of all
        its weights, computed once per job and shared by every stored-teacher group."""
        if self._teacher_identity is None:
            self._teacher_identity = teacher_identity(self.frozen_teacher[1], self.teacher_model.config)
        return self._teacher_identity

    def stored_topk(self, k: int, vocab: int) -> StoredTopK:
        """The teacher's top-``k`` next-token log-probabilities over the first ``vocab`` ids at every
        position of the labelled conversations (as their batches hold them: ``max_length`` tokens,
        padded), computed once and kept in ``<run>/teacher_topk/`` (reused while the teacher is the
        same: its identity is checked)."""
        if (k, vocab) in self._stored:
            return self._stored[(k, vocab)]
        tg, tvars = self.frozen_teacher
        identity = self.teacher_identity
        path = self.dir / "teacher_topk" / f"top{k}_vocab{vocab}.npz"
        out = StoredTopK.load(path) if path.exists() else None
        if out is None or out.source != identity or len(out) != len(self.labelled_enc.ids):
            length = self.cfg.max_length
            rows = C.padded_rows(self.labelled_enc.ids, self.labelled_enc.learn, length=length, pad_id=self.pad_id)
            t0 = time.perf_counter()
            out = store_sequence_topk(tg, tvars, rows, k=k, vocab_size=vocab, identity=identity, progress=self.progress)
            if self.primary:
                path.parent.mkdir(parents=True, exist_ok=True)
                out.save(path)
            self.echo(
                f"teacher outputs stored once: top-{k} of {len(out)} conversations x {length - 1} positions "
                f"in bf16 ({out.nbytes() / 2**20:.1f} MiB, {time.perf_counter() - t0:.1f} s)"
            )
        self._stored[(k, vocab)] = out
        return out

    def stored_spans(self, cross: _Cross, objective: CrossTokenizerKD, *, k: int, pad_id: int) -> StoredTopK:
        """The teacher's span values for a cross-tokenizer setting's rows, top ``k`` (the student's
        vocabulary rows: its gradient stays exact), computed once and kept in
        ``<run>/teacher_spans/`` (reused while the teacher, the loss and the rows are the same)."""
        tg, tvars = self.frozen_teacher
        identity = self.teacher_identity
        length = self.cfg.max_length
        path = (
            self.dir
            / "teacher_spans"
            / f"{slug(cross.name)}_{objective.name}_k{k}_n{len(cross.aligned)}_{len(cross.shared[0])}.npz"
        )
        source = f"{identity} {objective.name} T={objective.temperature:g}"
        out = StoredTopK.load(path) if path.exists() else None
        if out is not None and out.source == source and len(out) == len(cross.aligned):
            return out
        t0 = time.perf_counter()
        out = store_span_teacher(
            tg,
            tvars,
            cross.aligned,
            objective,
            k=k,
            length=length,
            pad_id=pad_id,
            teacher_pad_id=self.pad_id,
            shared=cross.shared,
            identity=identity,
            progress=self.progress,
        )
        if self.primary:
            path.parent.mkdir(parents=True, exist_ok=True)
            out.save(path)
        self.echo(
            f"{cross.name}: the teacher's span values stored once ({objective.name}): top-{k} of {len(out)} "
            f"conversations x {length - 1} spans in bf16 ({out.nbytes() / 2**20:.1f} MiB, "
            f"{time.perf_counter() - t0:.0f} s)"
        )
        return out

    # ---- measuring and reporting -------------------------------------------------------------------

    def measure(self, run: Run, t: Trained) -> list[dict]:
        cfg = self.cfg
        view = self.views.get(t.info.get("student"), self.view)  # the tokenizer the model reads
        per_seed = []
        for k, params in enumerate(t.weights):
            model = _as_decoder(t.graphdef, params)
            m, texts = measure(
                model,
                view.tokenizer,
                view.test_turns,
                view.test_enc,
                max_length=cfg.max_length,
                max_new_tokens=cfg.max_new_tokens,
                pad_id=view.pad_id,
                reference_texts=self.teacher_texts,
                tool_format=view.tool_format,
                tasks=view.test_tasks,
                tools=self.tools,
                max_turns=cfg.max_turns,
                pass_k=cfg.pass_k,
                pass_temperature=cfg.pass_temperature,
            )
            per_seed.append(m)
            if (warning := format_warning(m, view.tool_format, f"{t.name} (seed {k})")) is not None:
                self.echo("warning: " + warning)
            if k == 0:
                self.samples[t.name] = texts
            if t.role == "teacher":
                self.teacher_texts = texts
            elif run.primary and (
                run.folder.changed or not (run.path / slug(t.name) / f"seed{k}" / "config.json").exists()
            ):
                # written once, and again when a rerun measures with other settings (its positions)
                save_hf(model, run.path / slug(t.name) / f"seed{k}", tokenizer=view.tokenizer, overwrite=True)
        return per_seed

    def entry(self, run: Run, t: Trained, per_seed: list[dict]) -> dict:
        cfg = self.cfg
        saved = (
            (Path(cfg.teacher_dir) if cfg.teacher_dir else run.path / SAVED_TEACHER)
            if t.role == "teacher"
            else run.path / slug(t.name) / "seed0"
        )
        e = {**_entry(t.name, t.role, t.loss, t.model, per_seed, saved), **t.info}
        exact, ce = (e.get(f"{k}_mean") for k in ("tool_call_exact_match", "test_cross_entropy"))
        self.echo(
            f"{t.name}: test exact match {'-' if exact is None else f'{exact:.3f}'}, "
            f"cross-entropy {'-' if ce is None else f'{ce:.3f}'}"
        )
        return e

    def report(self, run: Run, entries: list[dict]) -> report.Report:
        return build_report(
            run.path,
            entries,
            self.samples,
            self.test_turns,
            histories=run.folder.read_log(),
            title=self.cfg.title,
            seconds=time.perf_counter() - run.started,
            tool_format=self.tool_format,
            tool_format_line=self.tool_format_line,
            tasks_line=self._tasks_line(),
            counts={
                **self.data.counts,
                "train_truncated": self.train_enc.truncated,
                "train_dropped": self.train_enc.dropped,
                "test_truncated": self.test_enc.truncated,
                "test_turns": len(self.test_turns),
                "test_turns_skipped": self.skipped_turns,
                "unlabelled_skipped": self.skipped_requests,
                "truncation_rule": C.TRUNCATION_RULE,
            },
        )

    def _tasks_line(self) -> str:
        cfg = self.cfg
        if not self.test_tasks:
            return (
                "Whole tasks in the loop are not measured: no tools run the models' calls (give them with --tools); "
                "the metrics are per assistant turn, after the reference conversation."
            )
        trials = (
            f"; pass^{cfg.pass_k}: the share of tasks solved in all of {cfg.pass_k} trials sampled at temperature "
            f"{cfg.pass_temperature:g}"
            if cfg.pass_k
            else ""
        )
        return (
            f"Task success: {len(self.test_tasks)} test conversations played in the loop by each model, greedy, up to "
            f"{cfg.max_turns} assistant turns, its calls run by the tools ({self.tools.source}); {TASK_SUCCESS_RULE}"
            f"{trials}."
        )


def _in_dtype(model: Decoder, dtype) -> Decoder:
    """``model`` with its floating parameters in ``dtype`` (itself when they are)."""
    if model.dtype == dtype:
        return model
    graphdef, state = nnx.split(model)
    return nnx.merge(graphdef, in_compute_dtype(state, dtype))


@dataclasses.dataclass(frozen=True)
class _Group:
    """One trained group of a student: its name, role, loss (in words) and objective; the teacher's
    answers join its rows (``with_answers``); its on-policy samples go through the tools; it trains
    on all the labelled conversations."""

    name: str
    role: str
    loss: str
    objective: TokenKD | OnPolicyKD | StoredTopKKD
    with_answers: bool = False
    through_tools: bool = False
    all_labels: bool = False
    quantize: str | None = None


def _groups(cfg: LMExperimentConfig, student: LMStudent, vocab: int, student_vocab: int) -> list[_Group]:
    """The trained groups of one student, in order; a distilled objective covers the ``vocab`` rows
    the teacher and the student share."""
    groups = (
        [_Group(f"{student.name} alone", "student_alone", "cross-entropy", TokenKD(kd_weight=0.0, ce_weight=1.0))]
        if cfg.include_baseline
        else []
    )
    for d in cfg.distillations:
        objective = d.objective
        if hasattr(objective, "vocab_size") and objective.vocab_size is None and vocab != student_vocab:
            objective = dataclasses.replace(objective, vocab_size=vocab)  # None already means all rows
        groups.append(
            _Group(
                f"{student.name} {d.name}",
                "distilled",
                _describe(d),
                objective,
                bool(d.teacher_answers),
                bool(d.through_tools),
                bool(d.all_labels),
                d.quantize,
            )
        )
    return groups


@dataclasses.dataclass(frozen=True, eq=False)
class _Cross:
    """A cross-tokenizer setting's rows: both models' tokenizations aligned, the tokens both
    vocabularies hold (``(teacher_ids, student_ids)``) and the student's name (its steps' key)."""

    aligned: AlignedRows
    shared: tuple[np.ndarray, np.ndarray]
    name: str

    def describe(self, objective: CrossTokenizerKD | None = None) -> str:
        """The spans in words: how many, the share that is exact, where the rest goes."""
        a = self.aligned
        exact, rest = 100 * a.exact_share, 100 * (1 - a.exact_share)
        if objective is not None and objective.divergence is None:
            how = f"ULD on all of them ({exact:.1f}% are one token with the same string in both)"
        else:
            div = "" if objective is None else f" ({type(objective.divergence).__name__} on them)"
            how = f"{exact:.1f}% exact, one token with the same string in both{div}; {rest:.1f}% through ULD"
        cut = f"; {a.cut} spans past --max-length left out" if a.cut else ""
        return f"{a.spans:,} learned spans, {how}{cut}"


def _across_tokenizers(objective) -> bool:
    """Whether ``objective`` trains a student whose tokenizer is not the teacher's: the
    cross-tokenizer losses, and the labels (or the teacher's answers) alone."""
    return isinstance(objective, CrossTokenizerKD) or (isinstance(objective, TokenKD) and objective.kd_weight == 0)


def _prepared_for(view: _View, convs: list[dict]) -> list[dict]:
    """Conversations as ``view``'s chat template takes them (its tool-call format's arguments)."""
    return [view.tool_format.prepare(c) for c in convs] if view.tool_format.arguments_as_string else convs


def _encoded(view: _View, convs: list[dict], *, max_length: int):
    """``(ids, learn)`` of ``convs`` in ``view``'s tokenizer (those with a learned token)."""
    enc = C.encode_conversations(view.tokenizer, _prepared_for(view, convs), max_length=max_length)
    return enc.ids, enc.learn


def read_back_weights(params, quant: str):
    """A student's weights as a GGUF file at ``quant`` holds them (what llama.cpp computes with);
    one compiled function per type (the rollouts of a QAT group call it every step)."""
    return _read_back(quant)(params)


@functools.lru_cache(maxsize=None)
def _read_back(quant: str):
    return jax.jit(functools.partial(fake_quantize, quant=quant))


def _as_decoder(graphdef, params) -> Decoder:
    model = nnx.merge(graphdef, params, nnx.State({}), nnx.State({}))
    return model


def _answered(r: LMJob, teacher: Decoder, echo):
    """The unlabelled requests with the teacher's answers, ``(ids, learn, conversations)``: training
    rows in the teacher's tokens and, when a student has its own tokenizer, the same exchanges as
    conversations (text); with tools, through the agent loop (the tools run the teacher's calls,
    the teacher answers their results)."""
    cfg = r.cfg
    sampling = SamplingConfig(temperature=cfg.answer_temperature) if cfg.answer_temperature > 0 else SamplingConfig()
    t0 = time.perf_counter()

    def answer(prompts, cache):
        return teacher_answers(
            teacher,
            prompts,
            cache_dir=r.dir / cache,
            max_new_tokens=cfg.max_new_tokens,
            sampling=sampling,
            batch_size=64,
            progress=r.progress,
        )

    def rows():
        first = answer(r.request_prompts, "answers")
        ex = agent_exchanges(
            r.data.tokenizer,
            r.request_conversations,
            r.request_prompts,
            first,
            tools=r.tools,
            answer=lambda prompts: answer(prompts, "answers_after_tools"),
            max_length=cfg.max_length,
            tool_format=r.tool_format,
        )
        text = r.views or any(isinstance(d.objective, CrossTokenizerKD) for d in cfg.distillations)
        convs = exchange_conversations(ex, r.data.tokenizer, r.tool_format) if text else []
        return (first, *exchange_rows(ex, max_length=cfg.max_length), ex.counts, convs)

    # several processes: process 0 answers and caches them, the others read its cache
    first, ids, learn, counts, convs = hosts.primary_first(rows, "jkd: teacher answers cached")
    full = sum(len(i) >= cfg.max_length for i in ids)
    failed = tool_failures(counts, cfg.tool_timeout)
    echo(
        f"teacher answers: {len(first)} requests answered, {counts['continued']} of them carried on after the tools' "
        f"results ({time.perf_counter() - t0:.0f} s; {full} rows at the {cfg.max_length}-token limit, longer ones cut)"
        + (
            f"; of {sum(counts.get(k, 0) for k in (OK, REFUSED, RAISED, TIMED_OUT))} tool calls, {failed}, each "
            "answered by the teacher from the error"
            if failed
            else ""
        )
    )
    return ids, learn, convs


def tool_failures(counts: dict, timeout_s: float) -> str:
    """The failed tool calls of ``counts`` (by status) in words, e.g. ``1 raised, 1 stopped after 1 s``
    (empty when none failed)."""
    return ", ".join(
        f"{counts[k]} {label}"
        for k, label in (
            (REFUSED, "refused by the tool's schema"),
            (RAISED, "raised"),
            (TIMED_OUT, f"stopped after {timeout_s:g} s"),
        )
        if counts.get(k)
    )


def guarded_inputs(cfg: LMExperimentConfig) -> dict:
    """The paths the run reads whose contents join its guard: the conversations and the teacher."""
    paths = {k: getattr(cfg, k) for k in ("train_file", "test_file", "unlabelled_file", "teacher_dir", "tools_file")}
    return {**paths, **{f"students[{i}].from_dir": s.from_dir for i, s in enumerate(cfg.students) if s.from_dir}}


def evaluation_keys(cfg: LMExperimentConfig) -> tuple[str, ...]:
    """The config keys that decide only what is measured: a rerun that changes only these (with
    ``resume``) reuses the trained students. ``max_new_tokens`` is one of them unless the teacher's
    answers (sequence-level or on-policy distillation) are generated with it."""
    answers = any(d.teacher_answers or isinstance(d.objective, OnPolicyKD) for d in cfg.distillations)
    return (
        "test_file",
        "test_limit",
        "file_digests.test_file",
        "devices",
        "mesh",
        "remat",
        "memory_limit_gib",
        "attention",
        "max_turns",
        "pass_k",
        "pass_temperature",
        "ptq",
    ) + (() if answers else ("max_new_tokens", "tool_format"))


def run(
    cfg: LMExperimentConfig,
    run_dir: str | Path,
    *,
    resume: bool = False,
    force: bool = False,
    progress: bool = True,
    echo: Callable[[str], None] = print,
) -> dict:
    """Carry out ``cfg`` in ``run_dir`` (the job skeleton, :mod:`jkd.jobs.skeleton`); returns the
    summary (also in ``summary.json``). Every input check that can be made before training is made
    before training; a rerun that changes only evaluation settings (:func:`evaluation_keys`) measures
    the trained students again."""
    return run_job(LMJob(cfg), run_dir, resume=resume, force=force, progress=progress, echo=echo)


def _prompt_slots(r: LMJob) -> int:
    longest = max(len(p) for p in r.request_prompts) if r.request_prompts else 64
    return int(min(r.cfg.max_length, -(-longest // 16) * 16))


def _describe(d: LMDistillation) -> str:
    o = d.objective
    div = (
        f"stored top-{o.top_k} ForwardKL"
        if isinstance(o, StoredTopKKD)
        else ("ULD" if o.divergence is None else f"hybrid {type(o.divergence).__name__}/ULD")
        if isinstance(o, CrossTokenizerKD)
        else type(o.divergence).__name__
    )
    if isinstance(o, OnPolicyKD):
        return f"on-policy {div} (lambda={o.student_fraction:g}" + (", through the tools)" if d.through_tools else ")")
    parts = []
    if o.kd_weight:
        parts.append(div if o.kd_weight == 1 else f"{o.kd_weight:g} {div}")
    if o.ce_weight:
        parts.append("CE" if o.ce_weight == 1 else f"{o.ce_weight:g} CE")
    return (
        " + ".join(parts)
        + (" on teacher answers" if d.teacher_answers else "")
        + (" (all labelled conversations)" if d.all_labels else "")
    )


def _entry(name, role, loss_name, config: DecoderConfig, per_seed: list[dict], saved: Path) -> dict:
    params = sum(int(x.size) for x in jax.tree.leaves(nnx.state(Decoder(config, rngs=nnx.Rngs(0)), nnx.Param)))
    weights = sum(p.stat().st_size for p in saved.glob("*.safetensors"))  # on disk, tokenizer aside
    e = {
        "name": name,
        "role": role,
        "loss": loss_name,
        "params": params,
        "size_bytes": weights,
        "seeds": len(per_seed),
        "per_seed": per_seed,
    }
    return {**e, **mean_std(per_seed)}

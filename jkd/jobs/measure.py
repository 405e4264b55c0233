"""Measuring a saved model on its own, outside a run: what ``jkd evaluate`` and ``jkd lm evaluate``
report (the same figures a run's report gives for that model)."""

from __future__ import annotations

import functools
from pathlib import Path


def evaluate_saved_model(
    model_dir: str | Path, *, dataset: str | None = None, data_dir: str | None = None, batch_size: int = 256
) -> dict:
    """Test-split metrics of a saved image model (default: on the dataset it was trained on):
    ``model``, ``dataset``, ``test_accuracy``, ``test_loss`` and the classification report."""
    import jax

    from jkd.data import augment, load_dataset
    from jkd.data import pipeline as P
    from jkd.evaluate import metrics as M
    from jkd.evaluate.predict import predict
    from jkd.saved import check_dataset, load_saved_model
    from jkd.train import eval_step

    graphdef, variables, meta = load_saved_model(model_dir)
    ds = load_dataset(dataset or meta["dataset"], data_dir=data_dir)
    check_dataset(meta, ds.spec, where=f"the model in {model_dir}")
    view = functools.partial(augment.normalize, mean=tuple(meta["mean"]), std=tuple(meta["std"]))
    fn = jax.jit(functools.partial(eval_step, graphdef=graphdef, view_fn=view))
    logits, labels = predict(
        lambda b: fn(variables, b)["logits"], P.reader(ds.split("test"), ds.spec.image_shape), batch_size=batch_size
    )
    rep = M.classification_report(logits, labels, ds.spec.num_classes)
    return {
        "model": meta["model"],
        "dataset": ds.spec.name,
        "test_accuracy": rep["accuracy"],
        "test_loss": rep["loss"],
        **rep,
    }


def evaluate_saved_lm(
    model_dir: str | Path,
    test_file: str | Path,
    *,
    max_length: int = 256,
    max_new_tokens: int = 64,
    tool_format: str | None = None,
    tools_file: str | None = None,
    tool_timeout_s: float = 30.0,
    max_turns: int = 3,
    pass_k: int = 0,
    pass_temperature: float = 1.0,
) -> dict:
    """Tool-use metrics and cross-entropy of a Hugging Face model folder on test conversations, as a
    run's report measures them (turns whose prompt exceeds ``max_length`` are skipped and counted).
    Calls are read in ``tool_format`` (None: the one the chat template writes); ``warnings`` says
    when the model's calls could not be read. With ``tools_file`` (a tools module, offered to
    conversations naming no tools) the conversations are also played as whole tasks in the loop:
    task success, and pass^k with ``pass_k`` sampled trials."""
    from jkd.agents.formats import tool_format_for
    from jkd.agents.tasks import tasks_from
    from jkd.agents.tools import Toolbox
    from jkd.data import conversations as C
    from jkd.evaluate.toolcalls import format_warning
    from jkd.data.tokenizer import Tokenizer
    from jkd.jobs.lm_evaluation import measure
    from jkd.models.hf import load_hf

    convs = C.read_conversations(test_file)
    tools = Toolbox.from_file(tools_file, timeout_s=tool_timeout_s) if tools_file else None
    if tools is not None:
        convs = [c if c.get("tools") else {**c, "tools": tools.schemas} for c in convs]
    model, tok = load_hf(model_dir), Tokenizer.from_folder(model_dir)
    fmt, how, warning = tool_format_for(tok, tool_format, convs)
    convs = [fmt.prepare(c) for c in convs]
    turns = C.assistant_turns(tok, convs)
    kept = [t for t in turns if len(t.prompt) <= max_length]
    if not kept:
        raise ValueError(f"every test turn's prompt is longer than --max-length {max_length}; raise it.")
    enc = C.encode_conversations(tok, convs, max_length=max_length)
    try:
        metrics, _ = measure(
            model,
            tok,
            kept,
            enc,
            max_length=max_length,
            max_new_tokens=max_new_tokens,
            pad_id=tok.pad_id if tok.pad_id is not None else 0,
            tool_format=fmt,
            tasks=tasks_from(convs) if tools is not None else (),
            tools=tools,
            max_turns=max_turns,
            pass_k=pass_k,
            pass_temperature=pass_temperature,
        )
    finally:
        if tools is not None:
            tools.close()
    warnings = [w for w in (warning, format_warning(metrics, fmt, str(model_dir))) if w]
    return {
        **metrics,
        "test_turns_skipped": len(turns) - len(kept),
        "conversations_truncated": enc.truncated,
        "tool_format": fmt.name,
        "tool_format_chosen": how,
        "warnings": warnings,
    }

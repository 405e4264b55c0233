"""Measuring a saved model on its own, outside a run: what ``jkd evaluate`` and ``jkd lm evaluate``
report (the same figures a run's report gives for that model)."""

from __future__ import annotations

import functools
from pathlib import Path


def evaluate_saved_model(model_dir: str | Path, *, dataset: str | None = None, data_dir: str | None = None,
                         batch_size: int = 256) -> dict:
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
    logits, labels = predict(lambda b: fn(variables, b)["logits"], P.reader(ds.split("test"), ds.spec.image_shape),
                             batch_size=batch_size)
    rep = M.classification_report(logits, labels, ds.spec.num_classes)
    return {"model": meta["model"], "dataset": ds.spec.name, "test_accuracy": rep["accuracy"], "test_loss": rep["loss"],
            **rep}


def evaluate_saved_lm(model_dir: str | Path, test_file: str | Path, *, max_length: int = 256,
                      max_new_tokens: int = 64) -> dict:
    """Tool-use metrics and cross-entropy of a Hugging Face model folder on test conversations, as a
    run's report measures them (turns whose prompt exceeds ``max_length`` are skipped and counted)."""
    from jkd.data import conversations as C
    from jkd.data.tokenizer import Tokenizer
    from jkd.jobs.lm_evaluation import measure
    from jkd.models.hf import load_hf

    convs = C.read_conversations(test_file)
    model, tok = load_hf(model_dir), Tokenizer.from_folder(model_dir)
    turns = C.assistant_turns(tok, convs)
    kept = [t for t in turns if len(t.prompt) <= max_length]
    if not kept:
        raise ValueError(f"every test turn's prompt is longer than --max-length {max_length}; raise it.")
    enc = C.encode_conversations(tok, convs, max_length=max_length)
    metrics, _ = measure(model, tok, kept, enc, max_length=max_length, max_new_tokens=max_new_tokens,
                         pad_id=tok.pad_id if tok.pad_id is not None else 0)
    return {**metrics, "test_turns_skipped": len(turns) - len(kept), "conversations_truncated": enc.truncated}

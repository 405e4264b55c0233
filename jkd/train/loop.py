"""The fit loop: the only place with Python state (progress, logging, checkpoint cadence)."""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, Iterator

import jax
import numpy as np

from jkd.train.checkpoint import Checkpoints, abstract_like


class NonFiniteError(FloatingPointError):
    """The loss or the gradient became NaN or infinite."""


@dataclasses.dataclass(frozen=True)
class LoopConfig:
    """Cadences of the fit loop, in steps."""

    num_steps: int
    save_every: int = 100
    eval_every: int = 0          # 0: evaluate only at the end
    sync_every: int = 10         # block on the device at least this often (CPU collectives
                                 # hang when >~30 steps are queued, see BUILD_NOTES)
    progress: bool = True


def _check_finite(step: int, metrics: dict) -> None:
    bad = {k: float(v) for k, v in metrics.items() if k in ("loss", "grad_norm") and not np.all(np.isfinite(np.asarray(v)))}
    if bad:
        raise NonFiniteError(
            f"non-finite values detected at step {step} (checked every few steps): {bad}. Likely causes: a learning rate too high "
            "(lower it or add warm-up), a temperature too small for the logits' scale, or bad "
            "input data (NaN/inf pixels, labels out of range). The last checkpoint before this "
            "step is intact; fix the cause and resume with --resume."
        )


def fit(
    run: Callable,
    state,
    objective,
    teacher,
    *,
    batches: Callable[[int], Iterator[dict]],
    config: LoopConfig,
    checkpoints: Checkpoints | None = None,
    evaluate: Callable[[object], dict] | None = None,
    log: Callable[[dict], None] | None = None,
):
    """Train ``state`` to ``config.num_steps`` steps; resume from ``checkpoints`` if they exist.

    Args:
      run: ``run(state, batch, objective, teacher) -> (state, metrics)`` from
        :mod:`jkd.train.parallel`.
      state: the initial state (also the template for restoring).
      batches: ``batches(start_step)`` yields batches from that data position on.
      evaluate: ``evaluate(state) -> {"val_accuracy": ..., ...}``, run every ``eval_every``
        steps and at the end; its ``val_accuracy`` selects the best checkpoint.
      log: called with each record (train metrics every ``sync_every`` steps, eval results).

    Returns:
      ``(state, history)``: the final state and the logged records.
    """
    if config.num_steps < 1 or config.save_every < 1 or config.sync_every < 1:
        raise ValueError(f"num_steps, save_every and sync_every must be >= 1; got {config}.")
    history: list[dict] = []

    def emit(record):
        history.append(record)
        if log is not None:
            log(record)

    start = 0
    if checkpoints is not None:
        restored = checkpoints.restore(abstract_like(state))
        if restored is not None:
            state, meta = restored
            start = int(meta["data_position"])
            emit({"event": "resumed", "step": start})
    bar = None
    if config.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=config.num_steps, initial=start, unit="step", dynamic_ncols=True)
    step, t0, n_images = start, time.perf_counter(), 0
    stream = batches(start)
    last_metrics = None
    try:
        while step < config.num_steps:
            batch = next(stream)
            state, metrics = run(state, batch, objective, teacher)
            step += 1
            n_images += len(batch["label"])
            last_metrics = metrics
            due_save = checkpoints is not None and (step % config.save_every == 0 or step == config.num_steps)
            due_eval = evaluate is not None and ((config.eval_every and step % config.eval_every == 0) or step == config.num_steps)
            if step % config.sync_every == 0 or due_save or due_eval:
                metrics = jax.device_get(metrics)  # the synchronisation point
                _check_finite(step, metrics)  # before anything of this state is saved
                rate = n_images / max(time.perf_counter() - t0, 1e-9)
                record = {"event": "train", "step": step, "images_per_s": rate,
                          **{k: float(np.mean(v)) for k, v in metrics.items()}}
                emit(record)
                if bar is not None:
                    bar.set_postfix(loss=f"{record['loss']:.4f}", img_s=f"{rate:.0f}")
                    bar.update(step - bar.n)
                t0, n_images = time.perf_counter(), 0
            meta = {"data_position": step}
            if due_eval:
                results = evaluate(state)
                emit({"event": "eval", "step": step, **results})
                meta.update({k: float(v) for k, v in results.items() if np.ndim(v) == 0})
            if due_save:
                checkpoints.save(step, state, meta=meta)
    finally:
        if bar is not None:
            bar.close()
        if checkpoints is not None:
            checkpoints.wait()
    if last_metrics is not None:
        _check_finite(step, jax.device_get(last_metrics))
    return state, history



"""The fit loop: the only place with Python state (progress, logging, checkpoint cadence)."""

from __future__ import annotations

import dataclasses
import sys
import time
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from jkd.train import parallel
from jkd.train.checkpoint import Checkpoints, abstract_like

_CAUSES = (
    "Likely causes: a learning rate too high (lower it or add warm-up), a temperature too small "
    "for the logits' scale, or bad input data (NaN/inf pixels, labels out of range)."
)


class NonFiniteError(FloatingPointError):
    """The loss, the gradient or the updated state became NaN or infinite."""


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) during :func:`fit`: ``step`` reached, ``saved_step`` the last checkpoint."""

    def __init__(self, step: int, saved_step: int | None):
        super().__init__(step, saved_step)
        self.step, self.saved_step = step, saved_step

    def __str__(self) -> str:
        saved = (
            f"the last checkpoint is step {self.saved_step}" if self.saved_step else "no checkpoint had been saved yet"
        )
        return f"interrupted at step {self.step}; {saved}"


@dataclasses.dataclass(frozen=True)
class LoopConfig:
    """Cadences of the fit loop, in steps."""

    num_steps: int
    save_every: int = 100
    eval_every: int = 0  # 0: evaluate only at the end
    sync_every: int = 10  # block on the device at least this often (CPU collectives
    # hang when >~30 steps are queued)
    progress: bool = True
    label: str = ""  # shown before the progress line
    progress_every_s: float = 10.0  # when the output is not a terminal: one line this often
    unit: str = "img"  # what a batch's rows are: the rate shown and logged ("img", "seq", "row");
    # batches with an attention_mask also log tokens_per_s (per student)


def _describe(value) -> str:
    """A metric for an error message: a number, or per-student values when several train."""
    v = np.asarray(value, np.float64)
    if v.ndim == 0:
        return f"{float(v):g}"
    bad = np.flatnonzero(~np.isfinite(v.reshape(-1)))
    return f"non-finite for students {bad.tolist()} of {v.size} ({np.array2string(v.reshape(-1), precision=4)})"


def _check_finite(step: int, metrics: dict) -> None:
    bad = {
        k: _describe(v)
        for k, v in metrics.items()
        if k in ("loss", "grad_norm") and not np.all(np.isfinite(np.asarray(v)))
    }
    if bad:
        detail = ", ".join(f"{k} {v}" for k, v in bad.items())
        raise NonFiniteError(
            f"non-finite values at step {step} (checked every few steps): {detail}. {_CAUSES} "
            "Nothing of this step was saved: the last checkpoint is intact; fix the cause and "
            "rerun with --resume."
        )


@jax.jit
def _all_finite(tree) -> jax.Array:
    leaves = [
        jnp.all(jnp.isfinite(x))
        for x in jax.tree.leaves(tree)
        if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.inexact)
    ]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def _check_state_finite(step: int, state) -> None:
    """What is saved must be finite: an update can overflow with a finite loss and gradient."""
    if not bool(_all_finite(state)):
        raise NonFiniteError(
            f"the update at step {step} made the model's parameters, optimizer state or BatchNorm "
            f"statistics non-finite, so step {step} was not saved. {_CAUSES} The last checkpoint "
            "is intact; fix the cause and rerun with --resume."
        )


_RATE_KEYS = {"img": "images_per_s", "seq": "sequences_per_s", "row": "rows_per_s"}


class _Progress:
    """A tqdm bar on a terminal; elsewhere (logs, CI, notebooks saved to files) one short line
    every ``every_s`` seconds and at the end, never carriage-return refreshes."""

    def __init__(self, total: int, initial: int, label: str, every_s: float, stream=None, unit: str = "img"):
        self.stream = stream if stream is not None else sys.stderr
        self.total, self.label, self.every_s, self.unit = total, label, every_s, unit
        self.bar, self._last = None, time.perf_counter()
        if getattr(self.stream, "isatty", lambda: False)():
            from tqdm.auto import tqdm

            self.bar = tqdm(
                total=total, initial=initial, unit="step", dynamic_ncols=True, desc=label or None, file=self.stream
            )

    def update(self, step: int, loss: float, rate: float) -> None:
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", **{f"{self.unit}_s": f"{rate:.0f}"})
            self.bar.update(step - self.bar.n)
            return
        now = time.perf_counter()
        if now - self._last >= self.every_s or step == self.total:
            self._last = now
            label = f"{self.label}: " if self.label else ""
            print(
                f"{label}step {step}/{self.total} ({100 * step / self.total:.0f}%), loss {loss:.4f}, "
                f"{rate:.0f} {self.unit}/s",
                file=self.stream,
                flush=True,
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


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
      batches: ``batches(start_step)`` yields batches from that data position on. A batch may be
        a function of the state being trained, ``batch(state) -> batch`` (called with the state as
        ``run`` holds it): the student's own samples, made with its weights of that step.
      evaluate: ``evaluate(state) -> {...}``, run every ``eval_every`` steps and at the end;
        its scalar results are logged and stored in the step's checkpoint metadata.
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
        restored = checkpoints.restore(abstract_like(state, getattr(run, "state_sharding", None)))
        if restored is not None:
            state, meta = restored
            start = int(meta["data_position"])
            emit({"event": "resumed", "step": start})
    placed = parallel.place(run, state)  # e.g. replicated onto pmap's devices once, not every step
    teacher = parallel.place_frozen(run, teacher)  # e.g. replicated on the mesh once, not every step
    processes = jax.process_count()  # each process feeds its share of the global batch
    bar = (
        _Progress(config.num_steps, start, config.label, config.progress_every_s, unit=config.unit)
        if config.progress
        else None
    )
    step, t0, n_images, n_tokens = start, time.perf_counter(), 0, 0
    rate_key = _RATE_KEYS.get(config.unit, f"{config.unit}_per_s")
    stream = batches(start)
    last_metrics = None
    failed = False
    try:
        while step < config.num_steps:
            batch = next(stream)
            if callable(batch):  # made from the state of this step (on-policy rollouts)
                batch = batch(placed)
            placed, metrics = run(placed, batch, objective, teacher)
            step += 1
            n_images += parallel.batch_size(batch) * processes
            if isinstance(batch, dict) and "attention_mask" in batch:  # a language model's rows: count tokens
                mask = np.asarray(batch["attention_mask"])  # [B, T], or [B, K, T] for K vmapped students
                n_tokens += int(mask.sum()) * processes // max(mask.size // (mask.shape[0] * mask.shape[-1]), 1)
            last_metrics = metrics
            due_save = checkpoints is not None and (step % config.save_every == 0 or step == config.num_steps)
            due_eval = evaluate is not None and (
                (config.eval_every and step % config.eval_every == 0) or step == config.num_steps
            )
            if step % config.sync_every == 0 or due_save or due_eval:
                metrics = jax.device_get(metrics)  # the synchronisation point
                _check_finite(step, metrics)  # before anything of this state is saved
                elapsed = max(time.perf_counter() - t0, 1e-9)
                rate = n_images / elapsed
                record = {
                    "event": "train",
                    "step": step,
                    rate_key: rate,
                    **({"tokens_per_s": n_tokens / elapsed} if n_tokens else {}),
                    **{k: float(np.mean(v)) for k, v in metrics.items()},
                }
                emit(record)
                if bar is not None:
                    bar.update(step, record["loss"], rate)
                t0, n_images, n_tokens = time.perf_counter(), 0, 0
            meta = {"data_position": step}
            if due_eval or due_save:
                state = parallel.fetch(run, placed)
            if due_eval:
                results = evaluate(state)
                emit({"event": "eval", "step": step, **results})
                meta.update({k: float(v) for k, v in results.items() if np.ndim(v) == 0})
            if due_save:
                _check_state_finite(step, state)
                checkpoints.save(step, state, meta=meta)
    except KeyboardInterrupt as e:
        failed = True
        done = []
        if checkpoints is not None:
            checkpoints.wait()  # a save in flight is finished, not left half-written
            done = checkpoints.steps()
        raise RunInterrupted(step, done[-1] if done else None) from e
    except BaseException:
        failed = True
        raise
    finally:
        if bar is not None:
            bar.close()
        if checkpoints is not None:
            try:
                checkpoints.wait()
            except Exception:
                if not failed:  # else the first error is the one to report
                    raise
    if last_metrics is not None:
        _check_finite(step, jax.device_get(last_metrics))
    return parallel.fetch(run, placed), history

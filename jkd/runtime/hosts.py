"""The processes of one run: how a multi-host run starts, who writes, and a lost peer told plainly.

A run on several hosts (a TPU slice's workers, a GPU cluster's nodes, or several processes on
one machine) is one ``jkd`` process per host, all with the same command; JAX's multi-controller
runtime (``jax.distributed``) joins them. The rules jkd's commands follow:

* **Start-up** (:func:`detect`, :func:`start`): the processes are joined when the command says
  how (``--coordinator HOST:PORT --num-processes N --process-id I``, or the environment variables
  ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``), or when the launcher is
  one JAX detects by itself: SLURM (``srun`` with more than one task), Open MPI (``mpirun`` with
  more than one rank), a multi-host Cloud TPU or GKE TPU slice. Anything else is one process,
  exactly as before.
* **Data**: each process reads only its share of every global batch (``--batch-size`` is the
  global batch); evaluation splits the split over the processes and gathers the logits
  (:func:`allgather_rows`), so every metric is over the whole split, once.
* **Outputs**: checkpoints and saved models are written by all processes together (orbax's
  multi-process saving writes each array once); logs, TensorBoard events, plots and reports by
  process 0 alone (:func:`is_primary`); progress is shown by process 0 alone.
* **Faults** (:class:`Watchdog`): every process beats on the coordination service's key-value
  store; a peer silent for ``peer_timeout_s`` (killed, crashed, its host gone), or one that
  stopped with an error, makes the others exit with an error naming it, instead of waiting
  forever on a collective. Checkpoints are complete only when every process finished writing
  them, so ``--resume`` on every host continues from the last step they all completed.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import threading
import time
from typing import Callable, Mapping

import numpy as np

ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"
LOST_PEER_EXIT_CODE = 3


@dataclasses.dataclass(frozen=True)
class Launch:
    """How this process joins the run: ``coordinator``, ``num_processes`` and ``process_id``
    given (``source`` "flags" or "environment"), or all ``None`` for a launcher JAX detects
    itself (``source`` names it)."""

    source: str
    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None


def _explicit(coordinator, num_processes, process_id, *, names: tuple[str, str, str], source: str) -> Launch | None:
    given = {n: v for n, v in zip(names, (coordinator, num_processes, process_id)) if v not in (None, "")}
    if not given:
        return None
    missing = [n for n in names if n not in given]
    if missing:
        raise ValueError(
            f"a multi-process run needs all of {', '.join(names)}; {', '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} missing (given: {', '.join(given)})."
        )
    try:
        n, i = int(num_processes), int(process_id)
    except (TypeError, ValueError):
        raise ValueError(
            f"{names[1]} and {names[2]} must be integers; got {num_processes!r} and {process_id!r}."
        ) from None
    if n < 1:
        raise ValueError(f"{names[1]} must be >= 1; got {n}.")
    if not 0 <= i < n:
        raise ValueError(f"{names[2]} must lie in [0, {n - 1}] for {n} processes; got {i}.")
    host, _, port = str(coordinator).rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(
            f"{names[0]} must be HOST:PORT (process 0's address, e.g. 10.0.0.1:8476); got {coordinator!r}."
        )
    if n == 1:
        return None  # one process: nothing to join
    return Launch(source, str(coordinator), n, i)


def _int(environ: Mapping[str, str], key: str) -> int:
    try:
        return int(environ.get(key, "0"))
    except ValueError:
        return 0


def detect(
    *,
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    environ: Mapping[str, str] | None = None,
    on_cloud_tpu_vm: bool | None = None,
) -> Launch | None:
    """How this process was launched (``None``: one process alone). Flags win over the
    environment; a partial or inconsistent set raises ``ValueError`` naming what is missing."""
    environ = os.environ if environ is None else environ
    launch = _explicit(
        coordinator,
        num_processes,
        process_id,
        names=("--coordinator", "--num-processes", "--process-id"),
        source="flags",
    )
    if launch is not None or any(v is not None for v in (coordinator, num_processes, process_id)):
        return launch
    launch = _explicit(
        environ.get(ENV_COORDINATOR),
        environ.get(ENV_NUM_PROCESSES),
        environ.get(ENV_PROCESS_ID),
        names=(ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID),
        source="environment",
    )
    if launch is not None or any(environ.get(k) for k in (ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID)):
        return launch
    # Launchers JAX reads by itself (jax._src.clusters): only when they start several processes.
    if (
        "SLURM_STEP_NODELIST" in environ
        and _int(environ, "SLURM_STEP_NUM_TASKS" if "SLURM_STEP_NUM_TASKS" in environ else "SLURM_NTASKS") > 1
    ):
        return Launch("SLURM")
    if "OMPI_MCA_orte_hnp_uri" in environ and _int(environ, "OMPI_COMM_WORLD_SIZE") > 1:
        return Launch("Open MPI")
    workers = environ.get("TPU_WORKER_HOSTNAMES") or environ.get("TPU_PROCESS_ADDRESSES") or ""
    if len([w for w in workers.split(",") if w.strip()]) > 1 or environ.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return Launch("Cloud TPU")
    if on_cloud_tpu_vm is None:
        on_cloud_tpu_vm = _on_cloud_tpu_vm()
    if on_cloud_tpu_vm:  # a TPU VM; JAX asks the metadata server how many hosts the slice has
        return Launch("Cloud TPU")
    return None


def _on_cloud_tpu_vm() -> bool:
    try:  # no public API says this; JAX's own cluster detection uses the same flag
        from jax._src.clusters.cloud_tpu_cluster import running_in_cloud_tpu_vm

        return bool(running_in_cloud_tpu_vm)
    except (ImportError, AttributeError):
        return False


# ---- one run's processes ------------------------------------------------------------------

_watchdog: "Watchdog | None" = None


def start(launch: Launch | None, *, peer_timeout_s: float = 30.0, echo: Callable[[str], None] | None = None) -> None:
    """Join the run's processes (before any JAX computation); ``None`` does nothing.

    JAX's own heartbeat is set ``peer_timeout_s + 30`` seconds, so jkd's :class:`Watchdog`
    (started here) reports a lost peer first and plainly.
    """
    global _watchdog
    if launch is None:
        return
    if peer_timeout_s <= 0:
        raise ValueError(f"--peer-timeout must be > 0 seconds; got {peer_timeout_s}.")
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU hosts; GPUs and TPUs use their own
    kw = {}
    if launch.coordinator is not None:
        kw = dict(
            coordinator_address=launch.coordinator, num_processes=launch.num_processes, process_id=launch.process_id
        )
    try:
        jax.distributed.initialize(**kw, heartbeat_timeout_seconds=int(peer_timeout_s) + 30)
    except Exception as e:  # noqa: BLE001 - reported with what to check
        where = f"the coordinator {launch.coordinator}" if launch.coordinator else f"the {launch.source} launcher's"
        raise ConnectionError(
            f"could not join the run's processes through {where} ({type(e).__name__}: {str(e)[:300]}). "
            "Start the same command on every host, each with its own --process-id (0 is the coordinator), "
            "and check that process 0's host and port are reachable."
        ) from e
    client = _client()
    if client is not None and jax.process_count() > 1:
        _watchdog = Watchdog(
            client, jax.process_index(), jax.process_count(), timeout_s=peer_timeout_s, on_lost=_exit_lost_peer
        )
        _watchdog.start()
    if echo is not None:
        echo(
            f"process {jax.process_index()} of {jax.process_count()} ({launch.source}); "
            f"{jax.local_device_count()} local of {jax.device_count()} devices"
        )


def finish(error: str | None = None) -> None:
    """This process is done: ``error`` is ``None`` on success (then wait for the others and
    leave the distributed runtime), else its one-line message, which the others report as the
    reason they stop; after an error the process must exit at once (``os._exit``), without
    JAX's shutdown barrier, which would wait for peers that are stopping."""
    global _watchdog
    if _watchdog is None:
        return
    watchdog, _watchdog = _watchdog, None
    watchdog.stop(error)
    if error is not None and is_primary():
        # The coordinator's store dies with process 0: stay long enough for the others to read why.
        time.sleep(2 * watchdog.interval_s + 1)
    if error is None:
        import jax

        jax.distributed.shutdown()


def await_lost_peer() -> None:
    """After an unexpected error in a run of several processes: a collective that failed because a
    peer died (gloo may see the closed connection before the watchdog sees the silence) is the
    peer's loss, so give the watchdog its timeout to say so (it then exits this process with the
    clear message); return if every peer is still alive."""
    watchdog = _watchdog
    if watchdog is not None and watchdog.is_alive():
        watchdog.join(timeout=watchdog.timeout_s + 3 * watchdog.interval_s)


def active() -> bool:
    """Several processes joined by :func:`start` (the CLI's own runs)."""
    return _watchdog is not None


def _client():
    try:  # the coordination service's key-value store; multihost_utils reaches it the same way
        from jax._src import distributed

        return distributed.global_state.client
    except (ImportError, AttributeError):
        return None


def _exit_lost_peer(message: str) -> None:
    print(f"\njkd: error: {message}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(LOST_PEER_EXIT_CODE)


class Watchdog(threading.Thread):
    """Beats every ``interval_s`` on the key-value store and watches the peers' beats.

    A peer whose beat has not changed for ``timeout_s`` (measured on this host's clock, so the
    hosts' clocks need not agree), a peer that reported an error, or a coordinator that cannot
    be reached for ``timeout_s`` calls ``on_lost(message)`` once; the message names the peer.
    A peer that reported success is no longer watched.
    """

    PREFIX = "jkd/hosts/"

    def __init__(
        self,
        client,
        process_id: int,
        num_processes: int,
        *,
        timeout_s: float,
        on_lost: Callable[[str], None],
        interval_s: float | None = None,
        clock=time.monotonic,
    ):
        super().__init__(name="jkd-watchdog", daemon=True)
        self.client, self.pid, self.n = client, process_id, num_processes
        self.timeout_s, self.on_lost, self.clock = timeout_s, on_lost, clock
        self.interval_s = interval_s if interval_s is not None else min(2.0, timeout_s / 5)
        self._stop_event = threading.Event()
        self._beat = 0
        now = clock()
        self._seen = {p: (None, now) for p in range(num_processes) if p != process_id}
        self._reachable_at = now

    def _key(self, kind: str, pid: int) -> str:
        return f"{self.PREFIX}{kind}/{pid}"

    def check_once(self) -> str | None:
        """One beat and one look at the peers; the message to report, or ``None``."""
        now = self.clock()
        try:
            self._beat += 1
            self.client.key_value_set(self._key("alive", self.pid), str(self._beat), allow_overwrite=True)
            entries = dict(self.client.key_value_dir_get(self.PREFIX))
        except Exception as e:  # noqa: BLE001 - any failure to reach the store counts
            if now - self._reachable_at >= self.timeout_s:
                return (
                    f"lost contact with process 0 (the coordinator) for {now - self._reachable_at:.0f} s "
                    f"({type(e).__name__}: {str(e)[:120]}); it was killed, crashed or its host is gone. "
                    "This process stops too. Rerun the same command on every host with --resume to continue "
                    "from the last checkpoint they all completed."
                )
            return None
        self._reachable_at = now
        entries = {"/".join(k.split("/")[-2:]): v for k, v in entries.items()}  # "alive/1", "done/0", ...
        for p in list(self._seen):
            failed = entries.get(f"failed/{p}")
            if failed is not None:
                return (
                    f"process {p} of {self.n} stopped with an error: {failed}. This process stops too; "
                    "fix the cause and rerun the same command on every host with --resume."
                )
            if f"done/{p}" in entries:
                del self._seen[p]
                continue
            beat = entries.get(f"alive/{p}")
            last, since = self._seen[p]
            if beat != last:
                self._seen[p] = (beat, now)
            elif now - since >= self.timeout_s:
                never = " (it never joined the beat)" if last is None else ""
                return (
                    f"process {p} of {self.n} stopped responding {now - since:.0f} s ago{never}: killed, crashed "
                    "or its host is gone. This process stops too. Rerun the same command on every host with "
                    "--resume to continue from the last checkpoint they all completed."
                )
        return None

    def run(self) -> None:
        while not self._stop_event.wait(self.interval_s):
            message = self.check_once()
            if message is not None and not self._stop_event.is_set():
                self.on_lost(message)
                return

    def stop(self, error: str | None = None) -> None:
        """Stop watching; tell the peers this process is done (``error``: how it failed)."""
        self._stop_event.set()
        try:
            if error is None:
                self.client.key_value_set(self._key("done", self.pid), "1", allow_overwrite=True)
            else:
                self.client.key_value_set(self._key("failed", self.pid), error[:500], allow_overwrite=True)
        except Exception:  # noqa: BLE001 - the coordinator may be gone; the peers' timeout applies
            pass


# ---- who writes, and data over the processes -------------------------------------------------


def process_index() -> int:
    import jax

    return jax.process_index()


def process_count() -> int:
    import jax

    return jax.process_count()


def is_primary() -> bool:
    """Process 0 writes the run's logs, plots and reports (one of them, not one per host)."""
    return process_index() == 0


def local(tree):
    """``tree`` with each array that spans other processes' devices replaced by this process's
    copy (a replicated array's first addressable shard): something a local computation (an
    evaluation, a latency measure) can take. Arrays this process holds whole are kept."""
    import jax

    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            if not x.is_fully_replicated:
                raise ValueError(
                    f"an array of shape {x.shape} is sharded over processes; only replicated arrays have a local copy."
                )
            return x.addressable_data(0)
        return x

    return jax.tree.map(one, tree)


def gathered(tree):
    """``tree`` with each array that is split over other processes' devices gathered whole onto
    this process (numpy): what saving a model or measuring it on one process needs. A collective
    when the run spans processes: every process calls it, in the same order."""
    import jax

    if process_count() == 1:
        return tree
    from jax.experimental import multihost_utils

    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return x

    return jax.tree.map(one, tree)


def shares(n: int, count: int | None = None) -> list[np.ndarray]:
    """Positions ``[0, n)`` split into ``count`` (default: the processes) contiguous shares, in
    process order: process ``i`` evaluates ``shares(n)[i]``."""
    return np.array_split(np.arange(n), process_count() if count is None else count)


def allgather_rows(x: np.ndarray, *, axis: int, sizes: list[int]) -> np.ndarray:
    """Every process's ``x`` (its ``sizes[i]`` rows along ``axis``), concatenated in process
    order on every process. A collective: every process calls it, in the same order."""
    from jax.experimental import multihost_utils

    x = np.asarray(x)
    axis = axis % x.ndim
    pad = max(sizes) - x.shape[axis]
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    stacked = np.asarray(multihost_utils.process_allgather(np.pad(x, widths), tiled=False))  # [P, ...]
    return np.concatenate([np.take(stacked[i], np.arange(s), axis=axis) for i, s in enumerate(sizes)], axis=axis)


def barrier(name: str) -> None:
    """Every process waits here until all arrive (no-op for one process)."""
    if process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def primary_first(fn: Callable[[], object], name: str):
    """``fn()`` on process 0 first, then on the others (a barrier between): for work that
    writes a shared cache, e.g. preparing a dataset, which concurrent processes would race on."""
    if process_count() == 1:
        return fn()
    if is_primary():
        out = fn()
        barrier(name)
        return out
    barrier(name)
    return fn()

"""jkd.runtime.hosts: how a multi-process run is detected, and the watchdog that names a lost peer."""

import numpy as np
import pytest

from jkd import cli
from jkd.runtime import hosts
from jkd.runtime.hosts import Launch, Watchdog, detect

NONE = {}


@pytest.mark.parametrize(
    "flags,environ,expected",
    [
        ({}, NONE, None),
        (
            dict(coordinator="10.0.0.1:8476", num_processes=4, process_id=2),
            NONE,
            Launch("flags", "10.0.0.1:8476", 4, 2),
        ),
        (dict(coordinator="10.0.0.1:8476", num_processes=1, process_id=0), NONE, None),  # one process: as before
        (
            {},
            {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"},
            Launch("environment", "h:1", 2, 1),
        ),
        # flags win over the environment
        (
            dict(coordinator="a:2", num_processes=2, process_id=0),
            {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "8", "JAX_PROCESS_ID": "5"},
            Launch("flags", "a:2", 2, 0),
        ),
        ({}, {"SLURM_STEP_NODELIST": "n[1-2]", "SLURM_STEP_NUM_TASKS": "2", "SLURM_NTASKS": "2"}, Launch("SLURM")),
        ({}, {"SLURM_STEP_NODELIST": "n1", "SLURM_STEP_NUM_TASKS": "1", "SLURM_NTASKS": "1"}, None),  # srun -n 1
        ({}, {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4"}, None),  # sbatch's shell, not an srun task
        ({}, {"OMPI_MCA_orte_hnp_uri": "1.0;tcp://h:1", "OMPI_COMM_WORLD_SIZE": "4"}, Launch("Open MPI")),
        ({}, {"OMPI_MCA_orte_hnp_uri": "1.0;tcp://h:1", "OMPI_COMM_WORLD_SIZE": "1"}, None),
        ({}, {"TPU_WORKER_HOSTNAMES": "w0,w1,w2,w3"}, Launch("Cloud TPU")),
        ({}, {"TPU_WORKER_HOSTNAMES": "localhost"}, None),
    ],
)
def test_detect(flags, environ, expected):
    assert detect(**flags, environ=environ, on_cloud_tpu_vm=False) == expected


def test_detect_on_a_tpu_vm_lets_jax_ask_the_metadata_server():
    assert detect(environ={}, on_cloud_tpu_vm=True) == Launch("Cloud TPU")


@pytest.mark.parametrize(
    "flags,environ,match",
    [
        (dict(coordinator="h:1"), NONE, "--num-processes, --process-id are missing"),
        (dict(num_processes=2, process_id=0), NONE, "--coordinator is missing"),
        (dict(coordinator="h:1", num_processes=2, process_id=2), NONE, r"--process-id must lie in \[0, 1\]"),
        (dict(coordinator="h:1", num_processes=0, process_id=0), NONE, "--num-processes must be >= 1"),
        (dict(coordinator="10.0.0.1", num_processes=2, process_id=0), NONE, "--coordinator must be HOST:PORT"),
        ({}, {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "two", "JAX_PROCESS_ID": "0"}, "must be integers"),
        ({}, {"JAX_NUM_PROCESSES": "2"}, "JAX_COORDINATOR_ADDRESS, JAX_PROCESS_ID are missing"),
    ],
)
def test_detect_refuses_a_partial_or_inconsistent_launch(flags, environ, match):
    with pytest.raises(ValueError, match=match):
        detect(**flags, environ=environ, on_cloud_tpu_vm=False)


class _Store:
    """The coordination service's key-value store, as the watchdog uses it."""

    def __init__(self):
        self.kv, self.down = {}, False

    def key_value_set(self, key, value, allow_overwrite=False):
        if self.down:
            raise ConnectionError("UNAVAILABLE: failed to connect")
        assert allow_overwrite or key not in self.kv
        self.kv[key] = value

    def key_value_dir_get(self, prefix):
        if self.down:
            raise ConnectionError("UNAVAILABLE: failed to connect")
        return [(k, v) for k, v in self.kv.items() if k.startswith(prefix)]


class _Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def _watchdogs(n=3, timeout=10.0):
    store, clock = _Store(), _Clock()
    dogs = [Watchdog(store, p, n, timeout_s=timeout, on_lost=lambda m: None, clock=clock) for p in range(n)]
    return store, clock, dogs


def test_watchdog_is_quiet_while_every_peer_beats():
    store, clock, dogs = _watchdogs()
    for _ in range(20):
        clock.t += 3.0  # beats 3 s apart, far longer than the timeout in total
        assert [d.check_once() for d in dogs] == [None, None, None]


def test_watchdog_names_the_peer_that_stopped_beating_after_the_timeout():
    store, clock, dogs = _watchdogs(timeout=10.0)
    for d in dogs:
        d.check_once()
    # Process 2 is killed after its first beat; 0 and 1 go on beating, 3 s apart. Each first
    # saw its beat at t=103 (process 2 beat after they had looked at t=100).
    for _ in range(4):
        clock.t += 3.0
        assert dogs[0].check_once() is None and dogs[1].check_once() is None
    clock.t += 3.0  # t=115: 12 s since process 2's beat last changed
    message = dogs[0].check_once()
    assert message.startswith("process 2 of 3 stopped responding 12 s ago") and "--resume" in message
    assert "process 2 of 3" in dogs[1].check_once()


def test_watchdog_reports_a_peer_that_never_joined():
    store, clock, dogs = _watchdogs(n=2, timeout=5.0)
    dogs[0].check_once()
    clock.t += 6.0
    assert "process 1 of 2 stopped responding 6 s ago (it never joined the beat)" in dogs[0].check_once()


def test_watchdog_relays_a_peers_error_and_ignores_a_peer_that_finished():
    store, clock, dogs = _watchdogs()
    for d in dogs:
        d.check_once()
    dogs[1].stop()  # done: no longer watched, however long it stays silent
    clock.t += 60.0
    dogs[2].check_once()
    assert dogs[0].check_once() is None
    dogs[2].stop("jkd distill: error: No space left on device: /runs/x")
    message = dogs[0].check_once()
    assert message.startswith("process 2 of 3 stopped with an error: jkd distill: error: No space left on device")


def test_watchdog_reports_a_lost_coordinator_after_the_timeout():
    store, clock, dogs = _watchdogs(n=2, timeout=10.0)
    dogs[1].check_once()
    store.down = True  # process 0 and its store are gone
    clock.t += 4.0
    assert dogs[1].check_once() is None  # a short outage is tolerated
    clock.t += 7.0
    message = dogs[1].check_once()
    assert message.startswith("lost contact with process 0 (the coordinator) for 11 s") and "UNAVAILABLE" in message


def test_the_watchdog_thread_calls_on_lost_once():
    store, lost = _Store(), []
    dog = Watchdog(store, 0, 2, timeout_s=0.2, interval_s=0.02, on_lost=lost.append)
    dog.start()
    dog.join(timeout=10)
    assert not dog.is_alive() and len(lost) == 1 and lost[0].startswith("process 1 of 2 stopped responding")


def test_share_is_contiguous_and_covers_every_example_once():
    parts = hosts.shares(10, 3)
    assert [p.tolist() for p in parts] == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    np.testing.assert_array_equal(np.concatenate(parts), np.arange(10))


def test_one_process_is_unchanged():
    assert not hosts.active() and hosts.is_primary()
    assert hosts.primary_first(lambda: 7, "x") == 7
    hosts.barrier("no-op for one process")


@pytest.mark.parametrize(
    "argv,match",
    [
        (["distill", "--auto", "--teacher-dir", "t"], "jkd distill --auto runs on one process"),
    ],
)
def test_commands_that_run_on_one_process_refuse_a_multi_process_launch(argv, match, tmp_path, capsys):
    flags = ["--coordinator", "127.0.0.1:1", "--num-processes", "2", "--process-id", "1"]
    assert cli.main(argv + ["--run-dir", str(tmp_path / "r")] + flags) == 2
    err = capsys.readouterr().err
    assert match in err and "--coordinator" in err
    assert not (tmp_path / "r").exists() and not hosts.active()


def test_a_partial_launch_is_a_one_line_error(tmp_path, capsys):
    assert cli.main(["demo", "--run-dir", str(tmp_path / "r"), "--num-processes", "2"]) == 2
    assert (
        "error: a multi-process run needs all of --coordinator, --num-processes, --process-id"
        in capsys.readouterr().err
    )


def test_an_unexpected_error_waits_for_the_watchdog_to_name_a_lost_peer(monkeypatch):
    """A collective broken by a dead peer may raise before the peer's silence is noticed: the
    error path waits for the watchdog (which exits the process with its message in a real run)."""
    lost = []
    dog = Watchdog(_Store(), 0, 2, timeout_s=0.3, interval_s=0.05, on_lost=lost.append)
    monkeypatch.setattr(hosts, "_watchdog", dog)
    dog.start()
    hosts.await_lost_peer()
    assert lost and lost[0].startswith("process 1 of 2 stopped responding")


def test_one_process_feeds_every_row_and_holds_every_array():
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    from jkd.models.decoder_sharding import make_mesh
    from jkd.train import parallel

    sharding = NamedSharding(make_mesh(2, 2), PartitionSpec("data"))
    np.testing.assert_array_equal(parallel.local_rows(sharding, 8), np.arange(8))
    x = jax.device_put(np.arange(8.0), sharding)
    assert hosts.gathered({"x": x})["x"] is x  # nothing to gather from other processes

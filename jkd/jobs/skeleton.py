"""The job skeleton: the one flow of every job that distils a teacher into students.

:func:`run_job` carries out a :class:`Job` in a run folder, in this order, the same for the image
job and the language-model job:

1. the folder is claimed under the config guard (the config's fields and the fingerprints of the
   inputs it reads, :func:`jkd.runtime.run_folder.guarded_config`; keys the job names
   ``reusable`` may change on ``--resume``) and locked; every process checks the guard, process 0
   alone writes, prints and shows progress (:class:`Run`);
2. ``job.prepare(run)`` reads and checks the data: every check that can be made before training is
   made there, before ``config.json`` is written;
3. the teacher (:func:`get_teacher`): given (``--teacher``, ``--teacher-dir``), saved by this run
   folder, or trained here and saved once;
4. ``job.students(run, teacher)`` trains each group of seeds in one vmapped state
   (:meth:`Run.train_group`: checkpoints per group, resume, the runner the config asks for);
5. each trained group is measured per seed (``job.measure``) and summarised over the seeds
   (``job.entry``, with :func:`jkd.jobs.seeds.mean_std`);
6. on process 0 ``job.report(run, entries)`` makes the figures and the table; the skeleton writes
   ``summary.json`` and ``report.md`` (:func:`jkd.evaluate.report.write`) and prints them;
7. every process returns process 0's summary.

The sweep and ``--auto`` use the parts (:func:`open_run`, :func:`get_teacher`) with their own
middle. A new job (another modality, another kind of student) subclasses :class:`Job` and lives
beside the others in ``jkd/jobs/``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from jkd.evaluate import report as report_md
from jkd.jobs.group import train_group
from jkd.jobs.teacher import SAVED_TEACHER, teacher_source
from jkd.runtime import hosts
from jkd.runtime.run_folder import RunFolder, guarded_config


@dataclasses.dataclass
class Trained:
    """One trained group: the teacher (one set of weights) or one student setting (one per seed).

    ``role``: ``teacher``, ``student_alone`` or ``distilled``; ``loss``: how it was trained, for
    the report; ``graphdef`` and ``weights``: the model, as the job's measure reads it; ``model``:
    what builds it (a ``ModelSpec``, a ``DecoderConfig``); ``info``: the job's own keys for the
    report's entry (the student size, its initialisation, ...).
    """

    name: str
    role: str
    loss: str
    graphdef: Any
    weights: list
    model: Any
    info: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Run:
    """What the skeleton gives a job: the claimed folder and this process's part in the run."""

    config: Any
    folder: RunFolder
    primary: bool  # process 0: it alone writes, prints and shows progress
    progress: bool
    echo: Callable[[str], None]
    started: float = dataclasses.field(default_factory=time.perf_counter)

    @property
    def path(self) -> Path:
        return self.folder.path

    def runner(self, step: Callable, *, shardings: Callable | None = None) -> Callable:
        """``step`` on the devices the config asks for (:mod:`jkd.train.parallel`): a
        ``(data, model)`` mesh when it names one (``mesh_shape()``), a mesh over the data when
        ``parallel`` is ``"mesh"`` or the run spans several processes, ``pmap``, else one device.
        ``shardings(tree, mesh)`` places the state and the teacher on a mesh (default: replicated)."""
        import jax

        from jkd.train import parallel

        shape = self.config.mesh_shape() if hasattr(self.config, "mesh_shape") else None
        kind, devices = getattr(self.config, "parallel", "single"), getattr(self.config, "devices", None)
        if shape is not None:
            from jkd.models.decoder_sharding import make_mesh

            mesh = make_mesh(*shape, devices=jax.devices()[: shape[0] * shape[1]])
            return parallel.on_mesh(step, mesh, shardings=shardings)
        if kind == "mesh" or jax.process_count() > 1:
            return parallel.on_mesh(step, parallel.data_mesh(devices), shardings=shardings)
        if kind == "pmap":
            return parallel.with_pmap(step, devices)
        return parallel.single_device(step)

    def train_group(self, name: str, run: Callable, state, objective, teacher, **kwargs):
        """:func:`jkd.jobs.group.train_group` in this run's folder, printing on process 0."""
        return train_group(self.folder, name, run, state, objective, teacher, echo=self.echo, **kwargs)


class Job:
    """What a job supplies to the skeleton; the methods it does not need keep these defaults.

    A job object lives for one run: :meth:`prepare` keeps what it reads on ``self``, and
    ``self.run`` (set by :func:`open_run`) is the :class:`Run`.
    """

    config: Any
    run: Run
    teacher_marker: str | None = None  # the file a saved teacher folder holds once complete

    def __init__(self, config):
        self.config = config

    # the run's context, as the job's own code reads it
    @property
    def folder(self) -> RunFolder:
        return self.run.folder

    @property
    def dir(self) -> Path:
        return self.run.path

    @property
    def echo(self) -> Callable[[str], None]:
        return self.run.echo

    @property
    def progress(self) -> bool:
        return self.run.progress

    @property
    def primary(self) -> bool:
        return self.run.primary

    def guarded_inputs(self) -> dict:
        """Name -> path of the inputs whose contents join the config guard."""
        return {}

    def reusable(self) -> tuple[str, ...]:
        """Config keys that decide only what is measured: they may change on ``--resume``."""
        return ()

    def prepare(self, run: Run) -> None:
        """Read and check the data (nothing trained yet; ``config.json`` not yet written)."""

    def load_teacher(self, run: Run, source: Path) -> Trained:
        raise NotImplementedError

    def train_teacher(self, run: Run) -> Trained:
        raise NotImplementedError

    def save_teacher(self, run: Run, teacher: Trained, path: Path) -> None:
        raise NotImplementedError

    def students(self, run: Run, teacher: Trained) -> Iterator[Trained]:
        """Train each student setting (all its seeds at once) and yield it."""
        return iter(())

    def measure(self, run: Run, trained: Trained) -> list[dict]:
        """The metrics of each seed of ``trained`` (called for the teacher first); saves the
        trained models where the job keeps them."""
        raise NotImplementedError

    def entry(self, run: Run, trained: Trained, per_seed: list[dict]) -> dict:
        """The report's row of ``trained``: its name, role, loss, size, and its metrics as mean and
        std over the seeds."""
        raise NotImplementedError

    def report(self, run: Run, entries: list[dict]) -> report_md.Report:
        """Figures, the table and the notes (called on process 0 only)."""
        raise NotImplementedError


@contextlib.contextmanager
def open_run(
    job: Job,
    run_dir: str | Path,
    *,
    resume: bool = False,
    force: bool = False,
    progress: bool = True,
    echo: Callable[[str], None] = print,
    config: dict | None = None,
) -> Iterator[Run]:
    """Claim ``run_dir`` for ``job`` (the guard: ``config``, default the job's config with its
    input fingerprints), prepare the job, write ``config.json``; yield the :class:`Run`; release
    the folder at the end, also on failure."""
    job.config.validate()
    primary = hosts.is_primary()
    guard = guarded_config(job.config, job.guarded_inputs()) if config is None else config
    folder = RunFolder(
        Path(run_dir), guard, resume=resume, force=force, reusable=job.reusable(), writer=primary, echo=echo
    )
    try:
        hosts.barrier("jkd: run folder claimed")  # a --force deletion by process 0 is complete
        run = Run(job.config, folder, primary, progress and primary, echo if primary else (lambda *_: None))
        job.run = run
        if folder.changed:
            run.echo(
                f"evaluation settings changed ({'; '.join(folder.changed)}): the trained models are reused "
                "and measured again"
            )
        job.prepare(run)  # reads and checks the data before anything is written
        folder.begin()
        yield run
    finally:
        folder.close()  # releases the folder's lock


def get_teacher(job: Job, run: Run) -> Trained:
    """The teacher: loaded from the folder the config names, or from this run folder's
    ``teacher/model``, or trained here and saved there once (a rerun loads it)."""
    source = teacher_source(getattr(job.config, "teacher_dir", None), run.folder, complete=job.teacher_marker)
    if source is not None:
        return job.load_teacher(run, source)
    teacher = job.train_teacher(run)
    job.save_teacher(run, teacher, run.path / SAVED_TEACHER)
    return teacher


def run_job(
    job: Job,
    run_dir: str | Path,
    *,
    resume: bool = False,
    force: bool = False,
    progress: bool = True,
    echo: Callable[[str], None] = print,
) -> dict:
    """Carry out ``job`` in ``run_dir`` (the module docstring's seven steps); returns the summary
    (also in ``summary.json``)."""
    with open_run(job, run_dir, resume=resume, force=force, progress=progress, echo=echo) as run:
        teacher = get_teacher(job, run)
        trained = [teacher, *job.students(run, teacher)]
        entries = [job.entry(run, t, job.measure(run, t)) for t in trained]
        if run.primary:  # one summary, one report and one set of figures, whatever the number of processes
            out = job.report(run, entries)
            md = report_md.write(run.path, entries, out)
            run.echo("\n" + md + "\n")
            for n in out.notes:
                run.echo(n)
            run.echo(f"\nrun folder: {run.path}")
        hosts.barrier("jkd: report written")  # the others return process 0's summary
        return json.loads((run.path / "summary.json").read_text())

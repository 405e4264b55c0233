"""The ``jkd`` command: a package of thin commands that parse flags, build a typed config and call
the library.

``jkd.cli.image`` (demo, run, train-teacher, distill), ``jkd.cli.artifacts`` (evaluate, export,
compress, report, models) and ``jkd.cli.lm`` (``jkd lm ...``) each add their subcommands and their
handlers; this module assembles the parser and turns failures into one line (exit 2) for what a
user or the machine got wrong, a traceback (exit 1) for a bug. The only name-to-object tables of jkd
(losses, optimizers) live in the command modules: the library below takes objects, never strings.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from jkd.cli import artifacts, image, lm
from jkd.cli.common import apply_overrides, load_config_file  # noqa: F401 - the public helpers of the CLI
from jkd.cli.image import LOSSES, _objective  # noqa: F401 - used by experiments and tests


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jkd", description="Knowledge distillation in JAX.")
    sub = parser.add_subparsers(dest="command", required=True)
    image.add_commands(sub)
    artifacts.add_commands(sub)
    lm.add_commands(sub)
    return parser


# What a user (or the machine) got wrong: one line and exit 2. Anything else is a bug of jkd's
# and keeps its traceback. ImportError counts only when jkd raised it with an install hint.
_USER_ERRORS = (
    ValueError,
    FileNotFoundError,
    FileExistsError,
    PermissionError,
    IsADirectoryError,
    NotADirectoryError,
    FloatingPointError,
    ConnectionError,
)


def _is_user_error(e: BaseException) -> bool:
    import errno

    from jkd.runtime.faults import is_disk_full

    if isinstance(e, _USER_ERRORS) or is_disk_full(e):
        return True
    if isinstance(e, OSError) and e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return True
    return isinstance(e, ImportError) and "pip install" in str(e)


class _DropDiskFullLogs:
    """orbax's writer threads log a full disk as ERROR records with tracebacks before the
    main thread sees the error; jkd then reports it once, plainly, so those are dropped."""

    def filter(self, record) -> bool:
        from jkd.runtime.faults import is_disk_full

        exc = record.exc_info[1] if record.exc_info else None
        return not (is_disk_full(exc) or "No space left on device" in record.getMessage())


def main(argv: list[str] | None = None) -> int:
    import logging

    import jkd
    from jkd.runtime import hosts

    jkd.initialize()  # before any JAX computation of this process
    parser = build_parser()
    args = parser.parse_args(argv)
    absl_logger = logging.getLogger("absl")
    if not any(isinstance(f, _DropDiskFullLogs) for f in absl_logger.filters):
        absl_logger.addFilter(_DropDiskFullLogs())
    code, failure = _run_command(args, parser)
    if hosts.active():  # a run over several processes: the others learn how this one ended
        hosts.finish(failure)
        if failure is not None:  # no shutdown barrier: the peers are stopping, not arriving
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    return code


def _run_command(args, parser) -> tuple[int, str | None]:
    """``(exit code, None)`` on success, else ``(code, the one-line reason)`` (already printed)."""
    try:
        _join_processes(args)
        return args.handler(args), None
    except KeyboardInterrupt as e:
        what = str(e) if str(e) else "interrupted"  # RunInterrupted says at which step
        run_dir = getattr(args, "run_dir", None) or getattr(args, "out", None)
        saved = f" Saved progress is kept in {run_dir}:" if run_dir else ""
        print(
            f"\njkd {args.command}: {what}.{saved} rerun the same command with --resume to continue "
            "from the last checkpoint.",
            file=sys.stderr,
        )
        return 130, what
    except Exception as e:  # noqa: BLE001 - sorted into user errors and bugs just below
        if not _is_user_error(e):
            import traceback

            from jkd.runtime import hosts

            hosts.await_lost_peer()  # a collective broken by a dead peer is reported as that peer's loss
            traceback.print_exc()
            print(
                f"jkd {args.command}: internal error ({type(e).__name__}). This is a bug in jkd, not in "
                "your input: please report it with the command and the traceback above.",
                file=sys.stderr,
            )
            return 1, f"internal error ({type(e).__name__}: {str(e)[:200]})"
        from jkd.runtime.faults import DiskFullError, disk_full, is_disk_full

        # Any full disk that reaches here unexplained (a plain ENOSPC OSError from a write jkd does
        # not wrap, or orbax's RESOURCE_EXHAUSTED) still gets the one line with the folder and
        # --resume: CI once saw a bare "No space left on device" from the tmpfs test.
        if is_disk_full(e) and not isinstance(e, DiskFullError):
            e = disk_full(Path(getattr(args, "run_dir", None) or "."), what="writing")
        from jkd.runtime.run_folder import ConfigMismatchError, mismatch_message

        # a changed config key is named by its flag too (student_steps (--steps))
        text = (
            mismatch_message(e.path, e.diff, getattr(args, "config_flag_names", {}))
            if isinstance(e, ConfigMismatchError)
            else _message(e)
        )
        print(f"jkd {args.command}: error: {text}", file=sys.stderr)
        _quiet_on_the_way_out()
        return 2, text


# The commands that run over several processes (one per host); the others run on one.
_MULTI_PROCESS = ("demo", "run", "train-teacher", "distill", "lm demo", "lm distill")


def _join_processes(args) -> None:
    """Join the run's other processes when launched as one of several (see :mod:`jkd.runtime.hosts`)."""
    from jkd.runtime import hosts

    if not hasattr(args, "peer_timeout"):
        return  # a command without a run folder: one process
    launch = hosts.detect(coordinator=args.coordinator, num_processes=args.num_processes, process_id=args.process_id)
    if launch is None:
        return
    command = args.command + (f" {args.lm_command}" if args.command == "lm" else "")
    if command not in _MULTI_PROCESS or getattr(args, "auto", False):
        what = "jkd distill --auto" if getattr(args, "auto", False) else f"jkd {command}"
        raise ValueError(
            f"{what} runs on one process, but this one was launched as one of several "
            f"({launch.source}); run it on one host, without --coordinator/--num-processes/--process-id. "
            f"Commands that run over several hosts: {', '.join('jkd ' + c for c in _MULTI_PROCESS)}."
        )
    hosts.start(launch, peer_timeout_s=args.peer_timeout, echo=print)


def _quiet_on_the_way_out() -> None:
    """After a reported error (a full disk above all), orbax's writer threads and event loop may
    still fail while the process exits; their tracebacks would bury the one line that matters."""
    import logging
    import threading

    threading.excepthook = lambda args: None
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    logging.getLogger("absl").setLevel(logging.CRITICAL)


def _message(e: BaseException) -> str:
    """One line: an OSError without its ``[Errno N]`` prefix, with its file and a hint."""
    if not isinstance(e, OSError) or not e.strerror:
        return str(e)
    text = e.strerror + (f": {e.filename}" if e.filename and str(e.filename) not in e.strerror else "")
    if e.errno in (13, 30) and "read-only" not in text:
        text += " (a read-only folder? choose another --run-dir or --out)"
    return text

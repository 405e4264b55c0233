"""What the commands share: flag types, the run-folder flags, ``--set KEY=VALUE`` overrides of a
config dataclass, and experiment config files."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib.util
import math
from pathlib import Path


def parse_assignment(text: str) -> tuple[str, object]:
    """``KEY=VALUE`` with the value read as a Python literal (a bare word is a string): the size
    options of ``--model-option``, whose types the model's factory checks."""
    key, raw = _split_assignment(text)
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw  # a bare word is a string
    return key, value


def _split_assignment(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise SystemExit(f"jkd: expected KEY=VALUE, got {text!r}")
    key, raw = text.split("=", 1)
    return key.strip(), raw


def apply_overrides(cfg, assignments: list[str]):
    """``key=value`` (or ``students[0].config.hidden_size=value``) overrides of a frozen config
    dataclass. A plain field's value is read by its type, as its derived flag reads it
    (:func:`jkd.cli.flags.parse_value`); other fields take a Python literal (``distillations=()``)."""
    for text in assignments or ():
        key, raw = _split_assignment(text)
        cfg = _replace_path(cfg, key.split("."), raw, key)
    return cfg


def _leaf_value(obj, name: str, raw: str, full_key: str):
    """The text ``raw`` as the value of field ``name`` of dataclass ``obj``."""
    import typing

    from jkd.cli.flags import _plain, parse_value

    try:
        plain = _plain(typing.get_type_hints(type(obj))[name])
    except Exception:  # noqa: BLE001 - a type that cannot be resolved: read a literal instead
        plain = None
    if plain is not None:
        try:
            return parse_value(raw, *plain, name=full_key)
        except ValueError as e:
            raise ValueError(f"--set {e}") from None
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return raw


def _replace_path(obj, path, raw, full_key):
    if "[" in path[0]:  # students[0].config.hidden_size: one element of a tuple field
        name, index = path[0].rstrip("]").split("[")
        items = getattr(obj, name, None)
        if not isinstance(items, tuple) or not index.isdigit() or int(index) >= len(items):
            raise SystemExit(f"jkd: {full_key!r}: {name} has no element {index}")
        items = list(items)
        if len(path) == 1:
            raise SystemExit(f"jkd: {full_key!r}: set a field of {name}[{index}], e.g. {name}[{index}].name=...")
        items[int(index)] = _replace_path(items[int(index)], path[1:], raw, full_key)
        return dataclasses.replace(obj, **{name: tuple(items)})
    names = {f.name for f in dataclasses.fields(obj)}
    if path[0] not in names:
        raise SystemExit(f"jkd: unknown config field {full_key!r}; fields here: {', '.join(sorted(names))}")
    if len(path) > 1:
        value = _replace_path(getattr(obj, path[0]), path[1:], raw, full_key)
    else:
        value = _leaf_value(obj, path[0], raw, full_key)
        if isinstance(getattr(obj, path[0]), tuple) and isinstance(value, (int, float)):
            value = (value,)
        elif isinstance(getattr(obj, path[0]), tuple) and isinstance(value, list):
            value = tuple(value)
    return dataclasses.replace(obj, **{path[0]: value})


def load_config_file(path: str):
    """An experiment's config module: ``get_config()`` and, for custom experiments, ``main()``."""
    p = Path(path)
    if not p.is_file():
        raise SystemExit(f"jkd: no config file at {p}")
    spec = importlib.util.spec_from_file_location(f"jkd_config_{p.parent.name}", p)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise SystemExit(f"jkd: {p} defines no get_config()")
    return module


def finite(text: str) -> float:
    """A flag's number: finite (``inf`` and ``nan`` would train nothing, or train on garbage)."""
    from jkd.cli.flags import parse_value

    try:
        return parse_value(text, float)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e).split(": ", 1)[-1]) from None


def seed_list(text: str) -> tuple[int, ...]:
    try:
        seeds = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, e.g. 0,1,2; got {text!r}") from None
    if len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"seeds must be distinct; got {text!r}")
    return seeds


def mesh_spec(text: str) -> tuple[int, int]:
    """``data=D,model=M`` (either may be left out: 1) as ``(D, M)``."""
    sizes = {"data": 1, "model": 1}
    for part in text.split(","):
        key, _, value = part.partition("=")
        if key.strip() not in sizes or not value.strip().isdigit() or int(value) < 1:
            raise argparse.ArgumentTypeError(
                f"expected data=D,model=M with whole numbers >= 1 (e.g. data=2,model=2); got {text!r}"
            )
        sizes[key.strip()] = int(value)
    return sizes["data"], sizes["model"]


def mesh_flag(p: argparse.ArgumentParser) -> None:
    """``--mesh data=D,model=M``: the ``mesh`` field of a language-model job's config."""
    p.add_argument(
        "--mesh",
        dest="config.mesh",
        type=mesh_spec,
        default=argparse.SUPPRESS,
        metavar="data=D,model=M",
        help="run the steps on a device mesh: the batch split over D data shards, the decoders' matrices "
        "over M model shards (tensor parallel) and the data shards (fully sharded); D x M devices",
    )


def remat_flag(p: argparse.ArgumentParser) -> None:
    """``--remat``: the ``remat`` field of a language-model job's config."""
    p.add_argument(
        "--remat",
        dest="config.remat",
        action="store_const",
        const=True,
        default=argparse.SUPPRESS,
        help="recompute each decoder block's activations in the backward pass: memory for about one "
        "more forward pass (the same values)",
    )


def float_list(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, e.g. 1,2,4; got {text!r}") from None
    if not all(math.isfinite(v) for v in values):
        raise argparse.ArgumentTypeError(f"expected finite numbers; got {text!r}")
    return values


def run_folder_flags(p: argparse.ArgumentParser, *, run_dir: str, several_hosts: bool = True) -> None:
    p.add_argument("--run-dir", default=run_dir, help=f"run folder (default {run_dir})")
    p.add_argument("--resume", action="store_true", help="continue the run in --run-dir (same config)")
    p.add_argument(
        "--force", action="store_true", help="delete the run in --run-dir (another config) and start this one"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    if not several_hosts:  # one process: a launch as several (SLURM, a TPU slice) is still detected and refused
        p.set_defaults(coordinator=None, num_processes=None, process_id=None, peer_timeout=30.0)
        return
    hosts = p.add_argument_group(
        "several hosts",
        "one process per host, the same command on each (a TPU slice, SLURM and Open MPI are "
        "detected without these flags); --batch-size stays the global batch",
    )
    hosts.add_argument(
        "--coordinator", default=None, metavar="HOST:PORT", help="process 0's address (or $JAX_COORDINATOR_ADDRESS)"
    )
    hosts.add_argument("--num-processes", type=int, default=None, help="processes in the run (or $JAX_NUM_PROCESSES)")
    hosts.add_argument("--process-id", type=int, default=None, help="this process, 0..N-1 (or $JAX_PROCESS_ID)")
    hosts.add_argument(
        "--peer-timeout",
        type=finite,
        default=30.0,
        metavar="SECONDS",
        help="stop with an error when another process is silent this long (default 30)",
    )

"""Flags derived from a job's config dataclass, so that a new config field cannot be forgotten by
the parser; ``--set KEY=VALUE`` parses its values by the same field types.

:func:`add_config_flags` gives every plain field of the config (a number, a string, a flag, one of
those or None, a tuple of numbers) a flag named after it (``test_limit`` -> ``--test-limit``),
unless the command sets that field with a hand-written flag of its own (``hand_written``: ``--steps``
for ``student_steps``). The help is the comment written beside the field in the dataclass.
:func:`config_overrides` returns the fields the user set, to apply with ``dataclasses.replace``.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import math
import re
import types
import typing
from typing import Any, Collection

_UNSET = argparse.SUPPRESS  # a derived flag that is not given leaves no attribute: the config's default holds


def _plain(tp) -> tuple[type, bool] | None:
    """``(base type, optional)`` of a field type a flag can carry, else None."""
    args = typing.get_args(tp)
    optional = False
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        optional = len(rest) < len(args)
        if len(rest) != 1:
            return None
        tp = rest[0]
        args = typing.get_args(tp)
    if tp in (int, float, str, bool):
        return tp, optional
    if typing.get_origin(tp) is tuple and len(args) == 2 and args[1] is Ellipsis and args[0] in (int, float, str):
        return tp, optional
    return None


def parse_value(text: str, tp, optional: bool = False, *, name: str = "value") -> Any:
    """``text`` as a value of field type ``tp`` (``none`` for an optional field; ``true``/``false``
    for a bool; comma-separated for a tuple). Numbers must be finite."""
    if optional and text.strip().lower() == "none":
        return None
    if typing.get_origin(tp) is tuple:  # 0,1,2 (or as Python writes it: (0, 1, 2))
        item = typing.get_args(tp)[0]
        return tuple(
            parse_value(t.strip(), item, name=name) for t in text.strip().strip("()[]").split(",") if t.strip()
        )
    if tp is bool:
        low = text.strip().lower()
        if low in ("true", "1", "yes"):
            return True
        if low in ("false", "0", "no"):
            return False
        raise ValueError(f"{name}: expected true or false; got {text!r}")
    if tp is int:
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"{name}: expected an integer; got {text!r}") from None
    if tp is float:
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"{name}: expected a number; got {text!r}") from None
        if not math.isfinite(value):
            raise ValueError(f"{name}: expected a finite number; got {text!r}")
        return value
    return text


def field_comments(cls) -> dict[str, str]:
    """The comment written beside each field in the dataclass's source (its continuation lines
    included), or nothing where the source cannot be read."""
    out: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            lines = inspect.getsource(klass).splitlines()
        except (OSError, TypeError):
            continue
        last = None
        for line in lines:
            m = re.match(r"\s+(\w+)\s*:[^#]*?(?:#\s*(.*))?$", line)
            if m and not line.strip().startswith("#"):
                last = m.group(1)
                if m.group(2):
                    out[last] = m.group(2).strip()
            elif last and line.strip().startswith("#") and last in out:
                out[last] += " " + line.strip().lstrip("#").strip()
            else:
                last = None
    return out


def derived_fields(cls, claimed: Collection[str] = ()) -> list[tuple[dataclasses.Field, type, bool]]:
    """The fields of ``cls`` that get a derived flag: plain ones no hand-written flag sets."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        plain = _plain(hints[f.name])
        if plain is not None and f.name not in claimed and f.init:
            out.append((f, *plain))
    return out


def same_names(*fields: str) -> dict[str, str]:
    """``{field: field}``: fields set by hand-written flags of their own name."""
    return {f: f for f in fields}


def add_config_flags(
    parser: argparse.ArgumentParser,
    cls,
    *,
    hand_written: dict[str, str] | None = None,
    ignored: Collection[str] = (),
    defaults: dict[str, Any] | None = None,
    title: str = "more settings",
) -> None:
    """A ``--field-name`` flag for every derived field of ``cls`` (see the module docstring).

    ``hand_written``: the fields the command's own flags (added before this call) set, field ->
    the flag's ``dest`` (``{"student_steps": "steps"}``); ``ignored``: fields that mean nothing to
    the command; ``defaults``: the values it uses where they are not the dataclass's (for the help).
    Every config field that has a flag is recorded with it (``args.config_flag_names``), so that
    the config guard can name ``student_steps (--steps)``."""
    hand_written = hand_written or {}
    options = {a.dest: a.option_strings[-1] for a in parser._actions if a.option_strings}
    names = {field: options[dest] for field, dest in hand_written.items() if dest in options}
    fields = derived_fields(cls, set(hand_written) | set(ignored))
    names.update({f.name: f"--{f.name.replace('_', '-')}" for f, *_ in fields})
    parser.set_defaults(config_flag_names=names)
    if not fields:
        return
    group = parser.add_argument_group(title, f"any field of {cls.__name__} without a flag above")
    comments = field_comments(cls)
    for f, tp, optional in fields:
        default = f.default if f.default is not dataclasses.MISSING else None
        default = (defaults or {}).get(f.name, default)
        shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
        helptext = comments.get(f.name, "")
        group.add_argument(
            names[f.name],
            dest=f"config.{f.name}",
            default=_UNSET,
            metavar=("true|false" if tp is bool else tp.__name__.upper() if isinstance(tp, type) else "A,B"),
            type=_flag_type(tp, optional, f.name),
            help=(helptext + " " if helptext else "") + f"(default: {shown})",
        )


def _flag_type(tp, optional: bool, name: str):
    def convert(text: str):
        try:
            return parse_value(text, tp, optional, name=name)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e).split(": ", 1)[-1]) from None

    convert.__name__ = getattr(tp, "__name__", "value")  # argparse names the type in its error
    return convert


def config_overrides(args: argparse.Namespace, cls) -> dict[str, Any]:
    """``{field: value}`` for the derived flags given on the command line."""
    return {
        f.name: getattr(args, f"config.{f.name}") for f in dataclasses.fields(cls) if hasattr(args, f"config.{f.name}")
    }

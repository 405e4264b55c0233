"""Tools an agent calls: plain Python functions, their JSON schemas, and a run that never stops.

``jkd lm distill --tools tools.py`` names a module of plain functions with type hints and Google-
style docstrings (a description, then ``Args:`` with one line per argument)::

    def get_weather(city: str, unit: Literal["c", "f"] = "c") -> dict:
        \"\"\"The weather in a city.

        Args:
            city: the city's name
            unit: degrees Celsius or Fahrenheit
        \"\"\"

Its public functions (or those listed in a module-level ``TOOLS``) become the :class:`Toolbox`.
:func:`function_schema` writes each one's schema as ``transformers.utils.get_json_schema`` does
(types, defaults as optional arguments, ``Literal`` as an enum, ``X | None`` as nullable).

:meth:`Toolbox.call` never raises and never hangs: a call the schema refuses (an unknown tool, a
missing, unknown or mistyped argument), a tool that raises, and a tool that runs past the timeout
each come back as a :class:`ToolResult` whose ``content`` tells the model what went wrong (what
the model reads as the tool's answer) and whose ``status`` says which it was. Tools from a file
run in a worker process of their own, which is stopped on a timeout and started again; tools
given as functions (:meth:`Toolbox.from_functions`, e.g. the embedded demo's simulated tools)
run in this process, where a timeout is reported but the call cannot be stopped.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import json
import multiprocessing
import re
import threading
import time
import types
import typing
from pathlib import Path
from typing import Any, Callable, Sequence


class ToolError(ValueError):
    """A tools module or function jkd cannot use, named with what was expected."""


# ---- schemas ------------------------------------------------------------------------------------------

_BASIC = {str: "string", int: "integer", float: "number", bool: "boolean", dict: "object", list: "array", Any: None}


def _type_schema(hint, where: str) -> dict:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        out = (
            _type_schema(rest[0], where) if len(rest) == 1 else {"type": [_type_schema(a, where)["type"] for a in rest]}
        )
        return {**out, "nullable": True} if len(rest) < len(args) else out
    if origin is typing.Literal:
        kinds = {_BASIC[type(a)] for a in args}
        return {"type": kinds.pop() if len(kinds) == 1 else sorted(kinds), "enum": list(args)}
    if origin in (list, tuple, set, Sequence) or hint in (list, tuple):
        out = {"type": "array"}
        if args and args[0] is not Ellipsis:
            out["items"] = _type_schema(args[0], where)
        return out
    if origin is dict or hint is dict:
        return {"type": "object"}
    if hint in _BASIC and _BASIC[hint] is not None:
        return {"type": _BASIC[hint]}
    raise ToolError(
        f"{where}: the type {hint!r} has no JSON schema; use str, int, float, bool, list[...], dict, "
        "Literal[...] or X | None"
    )


_SECTION = re.compile(r"^\s*(Args|Arguments|Parameters|Returns|Raises|Yields|Examples?|Notes?):\s*$", re.M)
_ARG = re.compile(r"\s*(\w+)(?:\s*\([^)]*\))?\s*:\s*(.*)$")


def _docstring(fn: Callable) -> tuple[str, dict[str, str]]:
    """The description (the text before the first section) and each argument's description (its
    line in ``Args:`` and the more-indented lines after it)."""
    parts = _SECTION.split(inspect.getdoc(fn) or "")  # [head, section, body, section, body, ...]
    body = next((parts[i + 1] for i in range(1, len(parts), 2) if parts[i] in ("Args", "Arguments", "Parameters")), "")
    described: dict[str, list[str]] = {}
    current, base = None, None
    for line in body.splitlines():
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip())
        m = _ARG.match(line)
        if m and (base is None or indent <= base):
            base, current = indent, m.group(1)
            described[current] = [m.group(2).strip()]
        elif current is not None:
            described[current].append(line.strip())
    return parts[0].strip(), {k: " ".join(x for x in v if x) for k, v in described.items()}


def function_schema(fn: Callable) -> dict:
    """``fn``'s tool schema, ``{"type": "function", "function": {"name", "description",
    "parameters"}}``, from its signature, type hints and docstring; a function without a docstring,
    or with an argument that has no type hint or no description, is refused by name."""
    name = fn.__name__
    description, args = _docstring(fn)
    if not description:
        raise ToolError(
            f"tool {name}: it needs a docstring (what the tool does, then 'Args:' with a line per argument)"
        )
    try:
        hints = typing.get_type_hints(fn)
    except Exception as e:  # an annotation that does not evaluate
        raise ToolError(f"tool {name}: its type hints do not evaluate ({e})") from None
    properties, required = {}, []
    for p in inspect.signature(fn).parameters.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            raise ToolError(f"tool {name}: *{p.name} / **{p.name} cannot be described to a model; name every argument")
        if p.name not in hints:
            raise ToolError(f"tool {name}: argument {p.name!r} needs a type hint")
        if p.name not in args:
            raise ToolError(f"tool {name}: argument {p.name!r} needs a line in the docstring's 'Args:' section")
        properties[p.name] = {
            **_type_schema(hints[p.name], f"tool {name}, argument {p.name!r}"),
            "description": args[p.name],
        }
        if p.default is p.empty:
            required.append(p.name)
    parameters = {"type": "object", "properties": properties}
    if required:
        parameters["required"] = required
    return {"type": "function", "function": {"name": name, "description": description, "parameters": parameters}}


def argument_defaults(fn: Callable) -> dict[str, Any]:
    """``fn``'s optional arguments and their default values (those JSON can hold): what a call that
    leaves one out means, so a judge of calls can accept either."""
    return {
        p.name: p.default
        for p in inspect.signature(fn).parameters.values()
        if p.default is not p.empty and isinstance(p.default, (str, int, float, bool, list, dict, type(None)))
    }


# ---- checking a call against its schema ----------------------------------------------------------------

_PY = {"string": str, "integer": int, "number": (int, float), "boolean": bool, "object": dict, "array": list}


def _fits(value, schema: dict) -> bool:
    if value is None:
        return bool(schema.get("nullable"))
    kinds = schema.get("type")
    kinds = kinds if isinstance(kinds, list) else [kinds]
    if not any(
        k in _PY and isinstance(value, _PY[k]) and not (isinstance(value, bool) and k != "boolean") for k in kinds
    ):
        return False
    if "enum" in schema and value not in schema["enum"]:
        return False
    if isinstance(value, list) and "items" in schema:
        return all(_fits(v, schema["items"]) for v in value)
    return True


def check_arguments(schema: dict, arguments: Any) -> str | None:
    """Why ``arguments`` do not fit the tool's ``schema`` (a sentence for the model), or None."""
    fn = schema["function"]
    params = fn.get("parameters") or {}
    props, required = params.get("properties", {}), params.get("required", [])
    if not isinstance(arguments, dict):
        return f"{fn['name']}: the arguments must be a JSON object; got {type(arguments).__name__}"
    missing = [k for k in required if k not in arguments]
    unknown = [k for k in arguments if k not in props]
    if missing or unknown:
        return (
            f"{fn['name']}: "
            + "; ".join(
                ([f"missing argument(s) {', '.join(missing)}"] if missing else [])
                + ([f"unknown argument(s) {', '.join(unknown)}"] if unknown else [])
            )
            + f"; it takes {', '.join(props) or 'no arguments'}"
        )
    for k, v in arguments.items():
        if not _fits(v, props[k]):
            want = props[k].get("type") + (f" in {props[k]['enum']}" if "enum" in props[k] else "")
            return f"{fn['name']}: argument {k}={json.dumps(v)} is not a valid {want}"
    return None


# ---- running tools -----------------------------------------------------------------------------------

OK, REFUSED, RAISED, TIMED_OUT = "ok", "refused", "raised", "timed_out"


@dataclasses.dataclass(frozen=True)
class ToolResult:
    """What a call gave: ``content`` (the text the model reads as the tool's answer: the result
    as JSON, or what went wrong), ``status`` (``ok``, ``refused``: the schema refused the call,
    ``raised``, ``timed_out``) and the seconds it took."""

    content: str
    status: str = OK
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status == OK


def result_values(content: str) -> list[str]:
    """The numbers and strings inside a tool's JSON result, as text (a result that is not JSON: the
    whole of it): what an answer that reports the result states."""
    try:
        result = json.loads(content)
    except json.JSONDecodeError:
        return [content]
    values: list[str] = []

    def walk(x):
        if isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)
        elif isinstance(x, (int, float, str)) and not isinstance(x, bool):
            values.append(str(x))

    walk(result)
    return values


def _as_content(value) -> str:
    return value if isinstance(value, str) else json.dumps(value, default=str)


def _run_here(fn: Callable, arguments: dict) -> tuple[str, str]:
    try:
        return OK, _as_content(fn(**arguments))
    except Exception as e:  # the tool's own failure goes back to the model
        return RAISED, f"error: {type(e).__name__}: {e}"


def _worker(path: str, conn) -> None:
    """The worker process: import the tools module, then answer ``(name, arguments)`` requests."""
    try:
        functions = {f.__name__: f for f in _module_functions(Path(path))}
    except Exception as e:
        conn.send(("failed", f"{type(e).__name__}: {e}"))
        return
    conn.send(("ready", ""))
    while True:
        try:
            request = conn.recv()
        except EOFError:
            return
        if request is None:
            return
        name, arguments = request
        conn.send(_run_here(functions[name], arguments))


def _module_functions(path: Path) -> list[Callable]:
    """The tools of a module file: its ``TOOLS`` list, or its public functions defined there."""
    if not path.is_file():
        raise ToolError(f"{path}: no such tools module (expected a .py file of plain functions)")
    spec = importlib.util.spec_from_file_location(f"jkd_user_tools_{abs(hash(str(path.resolve())))}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        raise ToolError(f"{path}: importing the tools module failed: {type(e).__name__}: {e}") from None
    if hasattr(module, "TOOLS"):
        fns = list(module.TOOLS)
        bad = [f for f in fns if not callable(f)]
        if bad:
            raise ToolError(f"{path}: TOOLS must list functions; {bad[0]!r} is not one")
    else:
        fns = [
            f
            for n, f in vars(module).items()
            if inspect.isfunction(f) and not n.startswith("_") and f.__module__ == module.__name__
        ]
    if not fns:
        raise ToolError(f"{path}: no tools (define public functions, or list them in TOOLS)")
    return fns


class Toolbox:
    """Tools by name with their schemas; :meth:`call` runs one (never raises, never hangs)."""

    def __init__(
        self,
        schemas: Sequence[dict],
        run: Callable[[str, dict, float | None], tuple[str, str]],
        *,
        timeout_s: float | None = None,
        source: str = "functions",
        defaults: dict[str, dict[str, Any]] | None = None,
    ):
        self.schemas = list(schemas)
        self.defaults = dict(defaults or {})  # {tool: {optional argument: default}}
        self.names = [s["function"]["name"] for s in self.schemas]
        if len(set(self.names)) != len(self.names):
            raise ToolError(f"{source}: two tools share a name: {self.names}")
        self._by_name = dict(zip(self.names, self.schemas))
        self._run = run
        self.timeout_s = timeout_s
        self.source = source

    @classmethod
    def from_functions(
        cls,
        functions: Sequence[Callable] | dict[str, Callable],
        *,
        schemas: Sequence[dict] | None = None,
        timeout_s: float | None = None,
        source: str = "functions",
    ) -> "Toolbox":
        """Tools that run in this process (a timeout is reported, the call is not stopped):
        functions, or ``{name: function}`` with their ``schemas`` (default: :func:`function_schema`
        of each function)."""
        by_name = dict(functions) if isinstance(functions, dict) else {f.__name__: f for f in functions}
        schemas = list(schemas) if schemas is not None else [function_schema(f) for f in by_name.values()]

        def run(name, arguments, timeout):
            if timeout is None:
                return _run_here(by_name[name], arguments)
            box: list = []
            thread = threading.Thread(target=lambda: box.append(_run_here(by_name[name], arguments)), daemon=True)
            thread.start()
            thread.join(timeout)
            return box[0] if box else (TIMED_OUT, None)

        return cls(
            schemas,
            run,
            timeout_s=timeout_s,
            source=source,
            defaults={n: argument_defaults(f) for n, f in by_name.items()},
        )

    @classmethod
    def from_file(cls, path: str | Path, *, timeout_s: float | None = 30.0) -> "Toolbox":
        """The tools of a module file (:func:`_module_functions`), run in a worker process that a
        timeout stops (and that starts again for the next call)."""
        path = Path(path)
        functions = _module_functions(path)
        schemas = [function_schema(f) for f in functions]  # refused here, before any run
        worker = _Worker(path)
        box = cls(
            schemas,
            worker.run,
            timeout_s=timeout_s,
            source=str(path),
            defaults={f.__name__: argument_defaults(f) for f in functions},
        )
        box._worker = worker
        return box

    def call(self, name: str, arguments: Any) -> ToolResult:
        """Run one call; see the module docstring for what comes back when it fails."""
        t0 = time.perf_counter()
        if name not in self._by_name:
            return ToolResult(f"error: unknown tool {name!r}; the tools are {', '.join(self.names)}", REFUSED)
        why = check_arguments(self._by_name[name], arguments)
        if why is not None:
            return ToolResult(f"error: {why}", REFUSED)
        status, content = self._run(name, arguments, self.timeout_s)
        seconds = time.perf_counter() - t0
        if status == TIMED_OUT:
            return ToolResult(
                f"error: {name} did not answer within {self.timeout_s:g} s and was stopped", TIMED_OUT, seconds
            )
        return ToolResult(content, status, seconds)

    def close(self) -> None:
        if getattr(self, "_worker", None) is not None:
            self._worker.close()


class _Worker:
    """A process that imports a tools module and runs its calls; stopped and restarted on a timeout."""

    def __init__(self, path: Path):
        self.path = path
        self.process = self.conn = None

    def _start(self) -> None:
        ctx = multiprocessing.get_context("spawn")  # never fork a process that runs JAX
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_worker, args=(str(self.path), child), daemon=True)
        self.process.start()
        child.close()
        if not self.conn.poll(120):
            self.close()
            raise ToolError(f"{self.path}: the tools worker did not start within 120 s")
        kind, message = self.conn.recv()
        if kind != "ready":
            self.close()
            raise ToolError(f"{self.path}: the tools worker could not import the module: {message}")

    def run(self, name: str, arguments: dict, timeout: float | None) -> tuple[str, str]:
        if self.process is None or not self.process.is_alive():
            self._start()
        self.conn.send((name, arguments))
        if self.conn.poll(timeout):
            try:
                return self.conn.recv()
            except EOFError:
                pass
            self.close()
            return RAISED, f"error: {name} ended its process without an answer"
        self.close()  # stopped; the next call starts a fresh worker
        return TIMED_OUT, ""

    def close(self) -> None:
        if self.process is not None:
            if self.process.is_alive():
                self.process.kill()
            self.process.join(5)
        if self.conn is not None:
            self.conn.close()
        self.process = self.conn = None

"""Tools a policy can call during a rollout: plain Python functions, described to the model by the
JSON schema of their type hints and docstring, run on the host.

    def lookup(word: str) -> str:
        '''Define a word.

        Args:
          word: the word to define.
        '''
    box = ToolBox([tools.calculator, lookup])
    box.schemas()                                 # OpenAI-style function schemas for a chat template
    box.run("calculator", {"expression": "12*34"}, deadline_s=5.0)   # '408'

A tool's result is text for the model to read. A failing call (an unknown tool, bad arguments, an
exception, a deadline passed) is text too, saying what went wrong, never an exception in the run:
a policy learns from a malformed call, it must not stop the training.

Built in: `calculator` (exact rational arithmetic, parsed with `ast`: no eval) and `python` (a
program run in the code sandbox, grpo_jax.rewards.sandbox, with its limits; its stdout).
"""

from __future__ import annotations

import ast
import concurrent.futures
import dataclasses
import fractions
import inspect
import math
import operator
import re
import time
import typing
from typing import Any, Callable, Sequence

_JSON_TYPES = {str: "string", int: "integer", float: "number", bool: "boolean", list: "array", dict: "object"}


@dataclasses.dataclass(frozen=True)
class Tool:
    """A function the model may call, with the schema a chat template shows it."""

    fn: Callable[..., Any]
    name: str
    description: str
    parameters: dict  # JSON schema of the arguments: {"type": "object", "properties", "required"}

    @classmethod
    def of(cls, fn: Callable[..., Any] | Tool) -> Tool:
        """A Tool from a function: its name, the docstring's first paragraph as the description,
        each argument's type hint as its JSON type and its line under "Args:" as its description."""
        if isinstance(fn, Tool):
            return fn
        doc = inspect.getdoc(fn) or ""
        described = dict(re.findall(r"^\s+(\w+)(?: \([^)]*\))?: (.+)$", doc.split("Args:", 1)[1], re.M)) \
            if "Args:" in doc else {}
        hints = typing.get_type_hints(fn)
        props, required = {}, []
        for name, p in inspect.signature(fn).parameters.items():
            kind = _JSON_TYPES.get(typing.get_origin(hints.get(name)) or hints.get(name), "string")
            props[name] = {"type": kind, **({"description": described[name]} if name in described else {})}
            if p.default is inspect.Parameter.empty:
                required.append(name)
        return cls(fn, fn.__name__, doc.split("\n\n", 1)[0].replace("\n", " "),
                   {"type": "object", "properties": props, "required": required})

    def schema(self) -> dict:
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                                                 "parameters": self.parameters}}


def _coerce(value: Any, kind: str) -> Any:
    """A text argument for a number or boolean parameter as that type (a call written as text, e.g.
    <call>add(5)</call>, passes "5"); anything else as it is."""
    if not isinstance(value, str) or kind not in ("integer", "number", "boolean"):
        return value
    text = value.strip()
    try:
        if kind == "integer":
            return int(text)
        if kind == "number":
            return float(text)
    except ValueError:
        raise ValueError(f"expected {'an integer' if kind == 'integer' else 'a number'}, got {value!r}") from None
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    raise ValueError(f"expected true or false, got {value!r}")


@dataclasses.dataclass(frozen=True)
class Result:
    """What a call returned to the model, and how it went (for the run's metrics)."""

    text: str
    tool: str
    error: bool = False  # the call failed (unknown tool, bad arguments, an exception): text says why
    timed_out: bool = False
    seconds: float = 0.0


class ToolBox:
    """Tools by name, run on a thread pool so that several rows' calls overlap each other and decode."""

    def __init__(self, tools: Sequence[Callable[..., Any] | Tool], workers: int = 8):
        self.tools = {t.name: t for t in map(Tool.of, tools)}
        # Two pools: `submit`'s calls wait (with their deadline) on the tools running in the other,
        # so a full pool of waiting calls can never starve the tools they wait for. A tool that
        # outlives its deadline keeps its thread until it returns (Python cannot stop it).
        self._pool = concurrent.futures.ThreadPoolExecutor(max(1, workers), thread_name_prefix="grpo_jax-tool")
        self._calls = concurrent.futures.ThreadPoolExecutor(max(1, workers), thread_name_prefix="grpo_jax-call")

    def schemas(self) -> list[dict]:
        return [t.schema() for t in self.tools.values()]

    def _start(self, name: str, arguments: dict | str,
               bound: dict[str, Tool] | None) -> concurrent.futures.Future | Result:
        """The call on the tool pool, or the Result that says why it cannot run."""
        tool = (bound or {}).get(name) or self.tools.get(name)
        if tool is None:
            names = list(self.tools) + [n for n in (bound or {}) if n not in self.tools]
            return Result(f"error: no tool named {name!r} (the tools are {', '.join(names) or 'none'})", name, error=True)
        if isinstance(arguments, str):
            names = list(tool.parameters["properties"])
            if len(names) != 1:
                return Result(f"error: {name} takes the arguments {names} by name", name, error=True)
            arguments = {names[0]: arguments}
        missing = [a for a in tool.parameters["required"] if a not in arguments]
        unknown = [a for a in arguments if a not in tool.parameters["properties"]]
        if missing or unknown:
            return Result(f"error: {name} needs {tool.parameters['required']}" + (f", not {unknown}" if unknown else ""),
                          name, error=True)
        try:
            arguments = {k: _coerce(v, tool.parameters["properties"][k]["type"]) for k, v in arguments.items()}
        except ValueError as e:
            return Result(f"error: {name}: {e}", name, error=True)
        return self._pool.submit(tool.fn, **arguments)

    @staticmethod
    def _wait(name: str, future: concurrent.futures.Future, deadline_s: float, start: float) -> Result:
        try:
            out = future.result(timeout=max(0.0, deadline_s - (time.perf_counter() - start)))
        except concurrent.futures.TimeoutError:
            return Result(f"error: {name} took longer than {deadline_s:g} s", name, error=True, timed_out=True,
                          seconds=time.perf_counter() - start)
        except Exception as e:  # noqa: BLE001 - a tool's failure is the model's observation
            return Result(f"error: {type(e).__name__}: {e}", name, error=True, seconds=time.perf_counter() - start)
        return Result(str(out), name, seconds=time.perf_counter() - start)

    def run(self, name: str, arguments: dict | str, deadline_s: float = 10.0,
            bound: dict[str, Tool] | None = None) -> Result:
        """Call tool `name` (among `bound`'s first: an episode's environment): a dict of keyword
        arguments, or one string for a tool of one argument."""
        start = time.perf_counter()
        call = self._start(name, arguments, bound)
        return call if isinstance(call, Result) else self._wait(name, call, deadline_s, start)

    def run_turn(self, calls: Sequence[tuple[str, dict | str]], deadline_s: float = 10.0,
                 bound: dict[str, Tool] | None = None) -> list[Result]:
        """A turn's calls, each with its own deadline: all at once on stateless tools; one after the
        other on an environment (`bound`), where a call that outlives its deadline stops the turn
        (it still runs, and the environment's state is no longer known)."""
        if bound is not None:
            out = []
            for name, arguments in calls:
                if out and out[-1].timed_out:
                    out.append(Result(f"error: {name} not run: an earlier call timed out", name, error=True))
                else:
                    out.append(self.run(name, arguments, deadline_s, bound))
            return out
        started = [(name, time.perf_counter(), self._start(name, arguments, None)) for name, arguments in calls]
        return [c if isinstance(c, Result) else self._wait(name, c, deadline_s, t) for name, t, c in started]

    def submit(self, name: str, arguments: dict | str, deadline_s: float = 10.0) -> concurrent.futures.Future:
        """`run` in the background: decode goes on while the call runs."""
        return self._calls.submit(self.run, name, arguments, deadline_s)

    def submit_turn(self, calls: Sequence[tuple[str, dict | str]], deadline_s: float = 10.0,
                    bound: dict[str, Tool] | None = None) -> concurrent.futures.Future:
        """`run_turn` in the background."""
        return self._calls.submit(self.run_turn, list(calls), deadline_s, bound)

    def close(self) -> None:
        self._calls.shutdown(wait=False, cancel_futures=True)
        self._pool.shutdown(wait=False, cancel_futures=True)


# --------------------------------------------------------------------------------------------------
# Built-in tools

_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod}
_MAX_DIGITS = 1000  # results and powers past this are refused, not computed (a 10**10**10 would hang)


def _exact(node: ast.AST) -> fractions.Fraction:
    if isinstance(node, ast.Expression):
        return _exact(node.body)
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return fractions.Fraction(str(node.value))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        v = _exact(node.operand)
        return -v if isinstance(node.op, ast.USub) else v
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        a, b = _exact(node.left), _exact(node.right)
        if isinstance(node.op, (ast.Div, ast.FloorDiv, ast.Mod)) and b == 0:
            raise ZeroDivisionError("division by zero")
        return fractions.Fraction(_BINARY[type(node.op)](a, b))
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Pow):
        a, b = _exact(node.left), _exact(node.right)
        if b.denominator != 1:
            raise ValueError("only whole powers are exact")
        if abs(b) * max(1.0, math.log10(max(abs(a.numerator), abs(a.denominator), 1))) > _MAX_DIGITS:
            raise ValueError(f"the power has more than {_MAX_DIGITS} digits")
        if a == 0 and b < 0:
            raise ZeroDivisionError("division by zero")
        return a ** int(b)
    raise ValueError(f"not arithmetic: {ast.unparse(node)!r}" if isinstance(node, ast.AST) else "not arithmetic")


def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression exactly: + - * / // % ** and parentheses on integers and decimals.

    Args:
      expression: the expression, e.g. 123*456 or (2+3)/4.
    """
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError:
        raise ValueError(f"cannot parse {expression!r}") from None
    v = _exact(tree)
    if len(str(v.numerator)) + len(str(v.denominator)) > _MAX_DIGITS:
        raise ValueError(f"the result has more than {_MAX_DIGITS} digits")
    if v.denominator == 1:
        return str(v.numerator)
    # A terminating decimal exactly (1/8 = 0.125); otherwise the fraction (1/3).
    d, places = v.denominator, {2: 0, 5: 0}
    for p in places:
        while d % p == 0:
            d, places[p] = d // p, places[p] + 1
    if d != 1:
        return f"{v.numerator}/{v.denominator}"
    k = max(places.values())
    scaled = abs(v.numerator) * 10 ** k // v.denominator
    whole, frac = divmod(scaled, 10 ** k)
    return f"{'-' if v < 0 else ''}{whole}.{frac:0{k}d}"


def python(code: str) -> str:
    """Run a Python program and return what it prints.

    Args:
      code: the program; print the values you need.
    """
    from grpo_jax.rewards.sandbox import runner

    out = runner.run_script(code, limits=runner.Limits(timeout_s=5.0, max_output=1 << 14))
    text = out["stdout"] if isinstance(out["stdout"], str) else out["stdout"].decode("utf-8", "replace")
    if out["timed_out"]:
        return text + "\n[timed out after 5 s]"
    if out["returncode"] != 0:
        return text + f"\n[exit status {out['returncode']}]"
    return text


BUILT_IN = {"calculator": calculator, "python": python}


# --------------------------------------------------------------------------------------------------
# Environments: tools with state


class Environment:
    """A task whose tools share state (a file system, a game, a database): a new instance per
    episode, `reset` from the episode's dataset row, and each call a method. Its tools are its public
    methods other than `reset` and `state`, described like functions (type hints, docstring).

        class Counter(tools.Environment):
            def reset(self, row):
                self.total = int(row["start"])

            def add(self, n: int) -> str:
                '''Add n to the total and return it.

                Args:
                  n: the number to add.
                '''
                self.total += n
                return str(self.total)

            def state(self):
                return {"total": self.total}

    A turn's calls run in order on its episode's instance. At the episode's end the reward functions
    read `state()` (keyword column `environment`, so it must pickle) beside the calls and results
    (column `tool_calls`)."""

    def reset(self, row: dict) -> None:
        """Start an episode of the dataset row `row`."""

    def state(self) -> Any:
        """What the reward functions read at the episode's end (picklable)."""
        return None

    @classmethod
    def tool_names(cls) -> list[str]:
        return [name for name, _ in inspect.getmembers(cls, inspect.isfunction)
                if not name.startswith("_") and name not in ("reset", "state", "tool_names", "tools")]

    def tools(self) -> dict[str, Tool]:
        """This instance's tools, by name (bound methods)."""
        return {name: Tool.of(getattr(self, name)) for name in self.tool_names()}


def environment_class(path: str) -> type[Environment]:
    """An Environment subclass by import path ("package.module.Class")."""
    import importlib

    module, _, attr = path.rpartition(".")
    cls = getattr(importlib.import_module(module), attr, None) if module else None
    if not (isinstance(cls, type) and issubclass(cls, Environment)):
        raise ValueError(f"tools.environment={path!r}: expected the import path of a grpo_jax.rollout.tools.Environment subclass")
    if not cls.tool_names():
        raise ValueError(f"tools.environment={path!r}: {cls.__name__} has no tool methods")
    return cls


def from_names(names: Sequence[str], workers: int = 8) -> ToolBox:
    """A ToolBox of built-in tools by name, or functions by import path ("package.module.function")."""
    import importlib

    fns = []
    for name in names:
        if name in BUILT_IN:
            fns.append(BUILT_IN[name])
        elif "." in name:
            module, attr = name.rsplit(".", 1)
            fns.append(getattr(importlib.import_module(module), attr))
        else:
            raise ValueError(f"tool {name!r}: expected one of {sorted(BUILT_IN)} or an import path (module.function)")
    return ToolBox(fns, workers)

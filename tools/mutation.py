#!/usr/bin/env python
"""Mutation testing of one module against its own tests: how many small faults do they catch?

Each *mutant* is a copy of the module with one classic operator mutation, applied through the
``ast`` module and written back as a minimal text edit (so line numbers and the rest of the file
stay as they are). The module's tests run against every mutant in a subprocess
(``pytest -x -q``): a failing run *kills* it, a run past the per-mutant timeout counts as killed
too (a hang is a detected fault), and a passing run lets it *survive*. The score is::

    score = (killed + timed out) / (total - equivalent)

where *equivalent* mutants (same observable behaviour as the original, so no test can kill them)
are listed, each with a line of reasoning, in ``tools/mutation_equivalent.json``.

Mutations (one at a time):

* arithmetic ``+ <-> -``, ``* <-> /``, ``** -> *``, ``// -> /`` (augmented assignments too) and
  the element-wise boolean operators ``& <-> |``;
* comparisons: the boundary (``< <-> <=``, ``> <-> >=``) and the negation (``< -> >=``,
  ``== <-> !=``, ``is <-> is not``, ``in <-> not in``);
* ``and <-> or``; removal of ``not``, unary ``-`` and ``~``;
* numbers: ``0 -> 1``, ``1 -> 0`` and ``1 -> 2``, other ints ``n -> n + 1``, other floats
  ``c -> 2 c``; ``True <-> False``;
* ``min <-> max`` (also ``minimum``/``maximum``, ``clamp_min``/``clamp_max``, ``amin``/``amax``,
  ``fmin``/``fmax``) and the ``min=``/``max=`` keywords of a call;
* ``torch.where(c, a, b) -> torch.where(c, b, a)``;
* ``return x -> return None``; removal of an in-place method call statement (``x.add_(y)``).

Never mutated: docstrings and other strings, type annotations and module-level type aliases,
``__all__``, ``raise`` and ``assert`` statements (error messages), logging/warning calls,
f-strings and ``if TYPE_CHECKING:`` blocks.

A mutant's id is ``line:col:operator`` (1-based, of the operator token or of the mutated node),
and its one-line diff shows the changed source line before and after.

Running: the package holding the module is copied to a temporary directory (one per job) that
goes first on ``PYTHONPATH``; the mutant is written there, never in the working tree, and the
temporary tree is removed on exit, Ctrl-C included (a check at start makes sure the tests import
the copy). A first run of the tests on the unmutated copy (it must pass) records which tests
execute each line of the module (a tracer in this file, loaded as a pytest plugin) and how long
each takes alone; each mutant then runs only the tests that execute its lines, fastest first,
then every test that starts processes (their lines run where the tracer cannot see). Mutants on
lines run at import, or on lines no test was seen to execute, run every test. ``--all-tests``
turns the selection off. To spare each run the imports of torch and the like, a warm server
process per job that has imported them (never the package under test) forks one pytest run per
mutant; ``--no-fork`` starts a fresh interpreter instead.

Usage::

    python tools/mutation.py --module src/steadystep/alrc.py --tests tests/test_alrc.py \\
        [--tests tests/test_alrc_distributed.py] [--jobs 2] [--out mutation-results/alrc.json]
    python tools/mutation.py --module src/steadystep/alrc.py --list      # ids and diffs only
    python tools/mutation.py --summary mutation-results/*.json [--fail-under 95]
"""

from __future__ import annotations

import argparse
import ast
import bisect
import contextlib
import copy
import inspect
import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_EQUIVALENTS = Path(__file__).resolve().with_name("mutation_equivalent.json")

# ----------------------------------------------------------------------------------------------
# Mutation operators
# ----------------------------------------------------------------------------------------------

_OP_TEXT: dict[type, str] = {
    ast.Add: "+",
    ast.Sub: "-",
    ast.Mult: "*",
    ast.Div: "/",
    ast.FloorDiv: "//",
    ast.Mod: "%",
    ast.Pow: "**",
    ast.MatMult: "@",
    ast.BitAnd: "&",
    ast.BitOr: "|",
    ast.BitXor: "^",
    ast.LShift: "<<",
    ast.RShift: ">>",
    ast.Lt: "<",
    ast.LtE: "<=",
    ast.Gt: ">",
    ast.GtE: ">=",
    ast.Eq: "==",
    ast.NotEq: "!=",
    ast.Is: "is",
    ast.IsNot: "is not",
    ast.In: "in",
    ast.NotIn: "not in",
    ast.And: "and",
    ast.Or: "or",
    ast.Not: "not",
    ast.USub: "-",
    ast.Invert: "~",
}

_BINOP_SWAPS: dict[type, tuple[type, ...]] = {
    ast.Add: (ast.Sub,),
    ast.Sub: (ast.Add,),
    ast.Mult: (ast.Div,),
    ast.Div: (ast.Mult,),
    ast.Pow: (ast.Mult,),
    ast.FloorDiv: (ast.Div,),
    ast.BitAnd: (ast.BitOr,),
    ast.BitOr: (ast.BitAnd,),
}

# First the boundary, then the negation.
_CMP_SWAPS: dict[type, tuple[type, ...]] = {
    ast.Lt: (ast.LtE, ast.GtE),
    ast.LtE: (ast.Lt, ast.Gt),
    ast.Gt: (ast.GtE, ast.LtE),
    ast.GtE: (ast.Gt, ast.Lt),
    ast.Eq: (ast.NotEq,),
    ast.NotEq: (ast.Eq,),
    ast.Is: (ast.IsNot,),
    ast.IsNot: (ast.Is,),
    ast.In: (ast.NotIn,),
    ast.NotIn: (ast.In,),
}

_NAME_SWAPS = {
    "min": "max",
    "max": "min",
    "minimum": "maximum",
    "maximum": "minimum",
    "clamp_min": "clamp_max",
    "clamp_max": "clamp_min",
    "clamp_min_": "clamp_max_",
    "clamp_max_": "clamp_min_",
    "amin": "amax",
    "amax": "amin",
    "fmin": "fmax",
    "fmax": "fmin",
}

_LOGGING_OWNERS = {"logging", "logger", "log", "_log", "_logger", "LOGGER", "warnings"}
_INPLACE_METHOD = re.compile(r"[a-z][a-z0-9_]*[a-z0-9]_\Z")


class MutationError(RuntimeError):
    """A mutant whose text edit does not give the intended tree (a bug of this tool)."""


@dataclass(frozen=True)
class Mutant:
    """One mutant: its stable id, the one-line diff and the mutated source."""

    id: str
    operator: str
    line: int
    diff: str
    lines: tuple[int, ...]  # lines whose execution reaches the mutated code
    source: str = field(repr=False)


Path_ = tuple[tuple[str, int | None], ...]  # (field, index) steps from the module to a node


@dataclass
class _Candidate:
    path: Path_
    operator: str
    anchor: int  # byte offset the id points at
    new_node: Callable[[ast.AST], ast.AST]  # the node as the mutant should parse
    edits: list[list[tuple[int, int, str]]]  # text edits to try in order (minimal first)
    span: tuple[int, int]  # lines of the mutated node
    stmt_line: int


def _replace_at(tree: ast.AST, path: Path_, new: Callable[[ast.AST], ast.AST]) -> None:
    parent: Any = tree
    for name, index in path[:-1]:
        parent = getattr(parent, name)
        if index is not None:
            parent = parent[index]
    name, index = path[-1]
    if index is None:
        setattr(parent, name, new(getattr(parent, name)))
    else:
        getattr(parent, name)[index] = new(getattr(parent, name)[index])


class _Source:
    """Byte offsets of a source file (``ast`` columns are UTF-8 byte offsets)."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.data = text.encode("utf-8")
        self.starts = [0]
        for i, b in enumerate(self.data):
            if b == 0x0A:
                self.starts.append(i + 1)

    def offset(self, line: int, col: int) -> int:
        return self.starts[line - 1] + col

    def span(self, node: ast.AST) -> tuple[int, int]:
        return (
            self.offset(node.lineno, node.col_offset),  # type: ignore[attr-defined]
            self.offset(node.end_lineno, node.end_col_offset),  # type: ignore[attr-defined]
        )

    def seg(self, node: ast.AST) -> str:
        a, b = self.span(node)
        return self.data[a:b].decode("utf-8")

    def line_col(self, offset: int) -> tuple[int, int]:
        line = bisect.bisect_right(self.starts, offset)
        col = len(self.data[self.starts[line - 1] : offset].decode("utf-8")) + 1
        return line, col

    def find_token(self, start: int, end: int, token: str) -> tuple[int, int]:
        """The span of ``token`` (an operator; spaces match any whitespace) in ``[start, end)``,
        skipping whitespace, parentheses, line continuations and comments before it."""
        i = start
        while i < end:
            c = self.data[i : i + 1]
            if c in (b" ", b"\t", b"\r", b"\n", b"(", b")", b"\\"):
                i += 1
            elif c == b"#":
                i = self.data.index(b"\n", i) + 1
            else:
                break
        pattern = r"\s+".join(re.escape(w) for w in token.split(" "))
        if token[0].isalpha():
            pattern += r"(?![A-Za-z0-9_])"
        m = re.compile(pattern.encode()).match(self.data, i, end)
        if m is None:
            raise MutationError(f"operator {token!r} not found at byte {i}")
        return m.start(), m.end()


def _type_alias(node: ast.Assign, module_level: bool) -> bool:
    """``Number = float | torch.Tensor`` at module level: a type, not a computation."""

    def is_type(n: ast.AST) -> bool:
        if isinstance(n, ast.BinOp) and isinstance(n.op, ast.BitOr):
            return is_type(n.left) and is_type(n.right)
        return isinstance(n, (ast.Name, ast.Attribute, ast.Subscript)) or (
            isinstance(n, ast.Constant) and n.value is None
        )

    return (
        module_level
        and isinstance(node.value, ast.BinOp)
        and is_type(node.value)
        and all(isinstance(t, ast.Name) for t in node.targets)
    )


def _skipped(node: ast.AST, module_level: bool) -> bool:
    """Subtrees never mutated (see the module docstring)."""
    if isinstance(node, (ast.Raise, ast.Assert, ast.JoinedStr, ast.Import, ast.ImportFrom)):
        return True
    if isinstance(node, ast.Assign):
        names = [t.id for t in node.targets if isinstance(t, ast.Name)]
        return "__all__" in names or _type_alias(node, module_level)
    if isinstance(node, ast.AugAssign | ast.AnnAssign):
        target = node.target
        return isinstance(target, ast.Name) and target.id == "__all__"
    if isinstance(node, ast.If):
        test = node.test
        name = (
            test.id
            if isinstance(test, ast.Name)
            else test.attr
            if isinstance(test, ast.Attribute)
            else None
        )
        if name == "TYPE_CHECKING":
            return True
        if (
            isinstance(test, ast.Compare)
            and isinstance(test.left, ast.Name)
            and test.left.id == "__name__"
        ):
            return True
    if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
        return True  # docstrings and other bare strings
    if isinstance(node, ast.Call):
        func = node.func
        if isinstance(func, ast.Name) and func.id == "print":
            return True
        if (
            isinstance(func, ast.Attribute)
            and isinstance(func.value, ast.Name)
            and func.value.id in _LOGGING_OWNERS
        ):
            return True
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        strings = (ast.JoinedStr,)
        for side in (node.left, node.right):
            if isinstance(side, strings) or (
                isinstance(side, ast.Constant) and isinstance(side.value, str)
            ):
                return True  # building a message
    return False


def _annotation_fields(node: ast.AST) -> set[str]:
    if isinstance(node, ast.arg | ast.AnnAssign):
        return {"annotation"}
    if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
        return {"returns"}
    return set()


class _Collector:
    """Walks the tree and lists every candidate mutation."""

    def __init__(self, src: _Source, tree: ast.Module) -> None:
        self.src = src
        self.tree = tree
        self.out: list[_Candidate] = []
        self._stmt_line = 1

    def walk(self, node: ast.AST, path: Path_, module_level: bool, stmt_line: int = 1) -> None:
        if _skipped(node, module_level):
            return
        if isinstance(node, ast.stmt):
            stmt_line = node.lineno
        self._stmt_line = stmt_line
        self._visit(node, path)
        skip = _annotation_fields(node)
        inner = isinstance(node, ast.Module)
        for name, value in ast.iter_fields(node):
            if name in skip:
                continue
            items = value if isinstance(value, list) else [value]
            for i, item in enumerate(items):
                if isinstance(item, ast.AST):
                    step = (name, i if isinstance(value, list) else None)
                    self.walk(item, (*path, step), inner, stmt_line)

    # -- helpers ---------------------------------------------------------------------------
    def _add(
        self,
        node: ast.AST,
        path: Path_,
        operator: str,
        anchor: int,
        new_node: Callable[[ast.AST], ast.AST],
        *edits: list[tuple[int, int, str]],
    ) -> None:
        self.out.append(
            _Candidate(
                path=path,
                operator=operator,
                anchor=anchor,
                new_node=new_node,
                edits=list(edits),
                span=(node.lineno, node.end_lineno or node.lineno),  # type: ignore[attr-defined]
                stmt_line=self._stmt_line,
            )
        )

    def _wrap(self, node: ast.AST) -> list[tuple[int, int, str]]:
        a, b = self.src.span(node)
        return [(a, a, "("), (b, b, ")")]

    # -- the operators ---------------------------------------------------------------------
    def _visit(self, node: ast.AST, path: Path_) -> None:
        src = self.src
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOP_SWAPS:
            gap = (src.span(node.left)[1], src.span(node.right)[0])
            a, b = src.find_token(*gap, _OP_TEXT[type(node.op)])
            for new in _BINOP_SWAPS[type(node.op)]:
                text = _OP_TEXT[new]
                minimal = [(a, b, text)]
                grouped = [(a, b, text), *self._wrap(node)]
                left = [*self._wrap(node.left), *grouped]
                right = [*grouped, *self._wrap(node.right)]
                full = [*self._wrap(node.left), *grouped, *self._wrap(node.right)]

                def make(n: ast.AST, new: type = new) -> ast.AST:
                    n = copy.copy(n)
                    n.op = new()  # type: ignore[attr-defined]
                    return n

                op = f"{type(node.op).__name__}->{new.__name__}"
                self._add(node, path, op, a, make, minimal, grouped, left, right, full)
        elif isinstance(node, ast.AugAssign) and type(node.op) in _BINOP_SWAPS:
            gap = (src.span(node.target)[1], src.span(node.value)[0])
            a, b = src.find_token(*gap, _OP_TEXT[type(node.op)] + "=")
            for new in _BINOP_SWAPS[type(node.op)]:

                def make(n: ast.AST, new: type = new) -> ast.AST:
                    n = copy.copy(n)
                    n.op = new()  # type: ignore[attr-defined]
                    return n

                op = f"{type(node.op).__name__}->{new.__name__}"
                self._add(node, path, op, a, make, [(a, b, _OP_TEXT[new] + "=")])
        elif isinstance(node, ast.Compare):
            left = node.left
            for i, (cmp, right) in enumerate(zip(node.ops, node.comparators, strict=True)):
                gap = (src.span(left)[1], src.span(right)[0])
                a, b = src.find_token(*gap, _OP_TEXT[type(cmp)])
                for new in _CMP_SWAPS.get(type(cmp), ()):

                    def make(n: ast.AST, new: type = new, i: int = i) -> ast.AST:
                        n = copy.copy(n)
                        n.ops = list(n.ops)  # type: ignore[attr-defined]
                        n.ops[i] = new()  # type: ignore[attr-defined]
                        return n

                    text = _OP_TEXT[new]
                    op = f"{type(cmp).__name__}->{new.__name__}"
                    self._add(node, path, op, a, make, [(a, b, text)], [(a, b, f" {text} ")])
                left = right
        elif isinstance(node, ast.BoolOp):
            old = type(node.op)
            new = ast.Or if old is ast.And else ast.And
            tokens = []
            for left, right in zip(node.values, node.values[1:], strict=False):
                tokens.append(src.find_token(src.span(left)[1], src.span(right)[0], _OP_TEXT[old]))
            minimal = [(a, b, _OP_TEXT[new]) for a, b in tokens]
            full = [e for v in node.values for e in self._wrap(v)] + minimal + self._wrap(node)

            def make(n: ast.AST, new: type = new) -> ast.AST:
                n = copy.copy(n)
                n.op = new()  # type: ignore[attr-defined]
                return n

            op = f"{old.__name__}->{new.__name__}"
            self._add(node, path, op, tokens[0][0], make, minimal, full)
        elif isinstance(node, ast.UnaryOp) and type(node.op) in (ast.Not, ast.USub, ast.Invert):
            a, b = src.span(node)
            oa, ob = src.span(node.operand)
            token = _OP_TEXT[type(node.op)]
            minimal = [(a, a + len(token), "")]
            full = [(a, oa, "("), (ob, b, ")")]
            op = f"{type(node.op).__name__}-del"
            self._add(node, path, op, a, lambda n: n.operand, minimal, full)  # type: ignore[attr-defined]
        elif isinstance(node, ast.Constant):
            self._constant(node, path)
        elif isinstance(node, ast.Call):
            self._call(node, path)
        elif isinstance(node, ast.Return) and node.value is not None:
            value = node.value
            if not (isinstance(value, ast.Constant) and value.value is None):
                a, b = src.span(value)

                def make(n: ast.AST) -> ast.AST:
                    n = copy.copy(n)
                    n.value = ast.Constant(value=None)  # type: ignore[attr-defined]
                    return n

                self._add(node, path, "Return-None", src.span(node)[0], make, [(a, b, "None")])
        elif (
            isinstance(node, ast.Expr)
            and isinstance(node.value, ast.Call)
            and isinstance(node.value.func, ast.Attribute)
            and _INPLACE_METHOD.match(node.value.func.attr)
        ):
            a, b = src.span(node)
            pad = "\n" * ((node.end_lineno or node.lineno) - node.lineno)
            op = f"Del-{node.value.func.attr}"
            self._add(node, path, op, a, lambda n: ast.Pass(), [(a, b, "pass" + pad)])

    def _constant(self, node: ast.Constant, path: Path_) -> None:
        v = node.value
        if isinstance(v, bool):
            news: list[Any] = [not v]
        elif isinstance(v, int):
            news = [1] if v == 0 else [0, 2] if v == 1 else [v + 1]
        elif isinstance(v, float):
            news = [1.0] if v == 0.0 else [0.0, 2.0] if v == 1.0 else [v * 2.0]
            news = [x for x in news if x == x and abs(x) != float("inf")]
        else:
            return
        a, b = self.src.span(node)
        for new in news:

            def make(n: ast.AST, new: Any = new) -> ast.AST:
                return ast.Constant(value=new)

            self._add(node, path, f"Const({v!r}->{new!r})", a, make, [(a, b, repr(new))])

    def _call(self, node: ast.Call, path: Path_) -> None:
        src = self.src
        func = node.func
        name = (
            func.id
            if isinstance(func, ast.Name)
            else func.attr
            if isinstance(func, ast.Attribute)
            else None
        )
        if name in _NAME_SWAPS:
            new = _NAME_SWAPS[name]
            fb = src.span(func)[1]
            a = fb - len(name.encode())

            def make(n: ast.AST, new: str = new) -> ast.AST:
                n = copy.copy(n)
                f = copy.copy(n.func)  # type: ignore[attr-defined]
                if isinstance(f, ast.Name):
                    f.id = new
                else:
                    f.attr = new  # type: ignore[attr-defined]
                n.func = f  # type: ignore[attr-defined]
                return n

            self._add(node, path, f"{name}->{new}", a, make, [(a, fb, new)])
        keywords = [k for k in node.keywords if k.arg in ("min", "max")]
        if keywords:
            swap = {"min": "max", "max": "min"}

            def make_kw(n: ast.AST) -> ast.AST:
                n = copy.copy(n)
                kws = []
                for k in n.keywords:  # type: ignore[attr-defined]
                    k = copy.copy(k)
                    if k.arg in swap:
                        k.arg = swap[k.arg]
                    kws.append(k)
                n.keywords = kws  # type: ignore[attr-defined]
                return n

            edits = []
            for k in keywords:
                a = src.offset(k.lineno, k.col_offset)
                edits.append((a, a + len(k.arg or ""), swap[k.arg or ""]))
            op = "kw-" + "+".join(f"{k.arg}->{swap[k.arg or '']}" for k in keywords)
            self._add(node, path, op, edits[0][0], make_kw, edits)
        if (
            name == "where"
            and len(node.args) == 3
            and not any(isinstance(x, ast.Starred) for x in node.args)
        ):
            (a1, b1), (a2, b2) = src.span(node.args[1]), src.span(node.args[2])
            t1, t2 = src.seg(node.args[1]), src.seg(node.args[2])

            def make_where(n: ast.AST) -> ast.AST:
                n = copy.copy(n)
                args = list(n.args)  # type: ignore[attr-defined]
                args[1], args[2] = args[2], args[1]
                n.args = args  # type: ignore[attr-defined]
                return n

            self._add(node, path, "where-swap", a1, make_where, [(a1, b1, t2), (a2, b2, t1)])


def _apply(data: bytes, edits: Sequence[tuple[int, int, str]]) -> bytes:
    out = data
    for a, b, text in sorted(edits, key=lambda e: (e[0], e[1]), reverse=True):
        out = out[:a] + text.encode("utf-8") + out[b:]
    return out


def _diff(before: str, after: str) -> str:
    """The changed lines, before and after, each side on one line."""
    old, new = before.splitlines(), after.splitlines()
    i = 0
    while i < min(len(old), len(new)) and old[i] == new[i]:
        i += 1
    j = 0
    while j < min(len(old), len(new)) - i and old[-1 - j] == new[-1 - j]:
        j += 1
    a = " ".join(x.strip() for x in old[i : len(old) - j] if x.strip())
    b = " ".join(x.strip() for x in new[i : len(new) - j] if x.strip())
    return f"{a}  -->  {b}"


def generate_mutants(text: str, filename: str = "<module>") -> list[Mutant]:
    """Every mutant of ``text``, in source order; each one verified to parse as intended."""
    tree = ast.parse(text, filename)
    src = _Source(text)
    collector = _Collector(src, tree)
    collector.walk(tree, (), True)
    mutants: list[Mutant] = []
    original_dump = ast.dump(tree)
    for cand in collector.out:
        expected = copy.deepcopy(tree)
        _replace_at(expected, cand.path, cand.new_node)
        want = ast.dump(expected)
        if want == original_dump:
            continue  # e.g. torch.where(c, x, x): no change
        for edits in cand.edits:
            mutated = _apply(src.data, edits).decode("utf-8")
            try:
                got = ast.dump(ast.parse(mutated, filename))
            except SyntaxError:
                continue
            if got == want:
                break
        else:
            line, col = src.line_col(cand.anchor)
            raise MutationError(f"{filename}:{line}:{col}: no text edit gives {cand.operator}")
        line, col = src.line_col(cand.anchor)
        lines = tuple(sorted({*range(cand.span[0], cand.span[1] + 1), cand.stmt_line}))
        mutants.append(
            Mutant(
                id=f"{line}:{col}:{cand.operator}",
                operator=cand.operator,
                line=line,
                diff=_diff(text, mutated),
                lines=lines,
                source=mutated,
            )
        )
    mutants.sort(key=lambda m: (m.line, int(m.id.split(":")[1]), m.operator))
    ids = [m.id for m in mutants]
    if len(ids) != len(set(ids)):
        raise MutationError(f"{filename}: duplicate mutant ids")
    return mutants


# ----------------------------------------------------------------------------------------------
# Line tracer, loaded into the baseline pytest run as a plugin (``-p mutation``)
# ----------------------------------------------------------------------------------------------

_COVERAGE_ENV = "MUTATION_COVERAGE_OUT"
_TARGET_ENV = "MUTATION_TARGET"


class _LineTracer:
    """Records, per test, the lines of one file it executes, and which tests start processes."""

    def __init__(self, target: str, out: str) -> None:
        self.targets = {target, os.path.realpath(target)}
        self.out = out
        self.current: str | None = None
        self.hits: dict[str | None, set[int]] = {}
        self.spawning: set[str] = set()
        self.durations: dict[str, float] = {}
        self.setup: dict[str, float] = {}
        self.shared: dict[str, list[str]] = {}
        self._t0 = 0.0

    def _owner(self, frame: Any) -> str | None:
        """Whose line this is: the current test's, or None (import time) for a module or class
        body, whichever test's lazy import (``steadystep.__getattr__``) happened to run it
        first: a constant defined there reaches every test."""
        return self.current if frame.f_code.co_flags & inspect.CO_NEWLOCALS else None

    def _global(self, frame: Any, event: str, arg: Any) -> Any:
        if frame.f_code.co_filename in self.targets:
            self.hits.setdefault(self._owner(frame), set()).add(frame.f_lineno)
            return self._local
        return None

    def _local(self, frame: Any, event: str, arg: Any) -> Any:
        if event == "line":
            self.hits.setdefault(self._owner(frame), set()).add(frame.f_lineno)
        return self._local

    def start(self) -> None:
        import multiprocessing.process

        tracer = self

        def flag(original: Callable[..., Any]) -> Callable[..., Any]:
            def wrapper(*args: Any, **kwargs: Any) -> Any:
                if tracer.current is not None:
                    tracer.spawning.add(tracer.current)
                return original(*args, **kwargs)

            return wrapper

        multiprocessing.process.BaseProcess.start = flag(  # type: ignore[method-assign]
            multiprocessing.process.BaseProcess.start
        )
        subprocess.Popen.__init__ = flag(subprocess.Popen.__init__)  # type: ignore[method-assign]
        threading.settrace(self._global)
        sys.settrace(self._global)

    def pytest_runtest_logstart(self, nodeid: str, location: Any) -> None:
        self.current = nodeid
        self._t0 = time.perf_counter()
        sys.settrace(self._global)  # a previous test may have replaced it

    def pytest_runtest_logfinish(self, nodeid: str, location: Any) -> None:
        self.durations[nodeid] = time.perf_counter() - self._t0
        self.current = None

    def pytest_runtest_setup(self, item: Any) -> None:
        # Fixtures shared beyond one test: the first user pays their setup, the others seem
        # free, yet any of them run alone would pay it too.
        info = getattr(item, "_fixtureinfo", None)
        defs = getattr(info, "name2fixturedefs", {}) or {}
        self.shared[item.nodeid] = sorted(
            name for name, d in defs.items() if d and d[-1].scope != "function"
        )

    def pytest_runtest_logreport(self, report: Any) -> None:
        if report.when == "setup":
            self.setup[report.nodeid] = report.duration

    def _costs(self) -> dict[str, float]:
        """Seconds each test takes when run alone: its own time plus its shared fixtures'."""
        fixture: dict[str, float] = {}
        for test, names in self.shared.items():
            for name in names:
                fixture[name] = max(fixture.get(name, 0.0), self.setup.get(test, 0.0))
        return {
            t: d + sum(fixture[n] for n in self.shared.get(t, ()))
            for t, d in self.durations.items()
        }

    def pytest_sessionfinish(self, session: Any, exitstatus: int) -> None:
        sys.settrace(None)
        threading.settrace(None)  # type: ignore[arg-type]
        data = {
            "hits": {k: sorted(v) for k, v in self.hits.items() if k is not None},
            "import": sorted(self.hits.get(None, ())),
            "spawning": sorted(self.spawning),
            "durations": self._costs(),
        }
        Path(self.out).write_text(json.dumps(data))


def pytest_configure(config: Any) -> None:
    """Plugin entry point: active only in the baseline run started by this tool."""
    out, target = os.environ.get(_COVERAGE_ENV), os.environ.get(_TARGET_ENV)
    if out and target:
        tracer = _LineTracer(target, out)
        tracer.start()
        config.pluginmanager.register(tracer, "mutation-line-tracer")


# ----------------------------------------------------------------------------------------------
# Running the tests
# ----------------------------------------------------------------------------------------------


@dataclass
class Result:
    id: str
    operator: str
    line: int
    diff: str
    status: str  # killed | timeout | survived | equivalent
    seconds: float
    tests_run: int  # -1: the whole test files (--all-tests)
    killed_by: str | None = None
    note: str | None = None


def _package_root(module: Path) -> tuple[Path, Path]:
    """``(directory on sys.path, top-level package or module)`` for ``module``."""
    top = module
    while (top.parent / "__init__.py").exists():
        top = top.parent
    return top.parent, top


_PYTEST_ARGS = ["-x", "-q", "-p", "no:cacheprovider", "--no-header"]


def _serve(root: str, preload: str) -> None:
    """The fork server: import the third-party modules once, then fork one pytest run per
    request (a JSON line on stdin), answering ``{"pid": ...}`` then ``{"status": ...}``.

    The package under test is never imported here, so every child imports its own copy.
    """
    import importlib

    here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != here]
    for name in json.loads(Path(preload).read_text(encoding="utf-8")):
        with contextlib.suppress(Exception):
            importlib.import_module(name)
    for line in sys.stdin:
        request = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            _child(root, request)
        print(json.dumps({"pid": pid}), flush=True)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"status": os.waitstatus_to_exitcode(status)}), flush=True)


def _child(root: str, request: dict[str, Any]) -> None:
    """One pytest run in a forked child of the server; never returns."""
    code = 3
    try:
        os.setsid()  # its own process group: a timeout kills what it started too
        log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
        os.environ["PYTHONPATH"] = request["pythonpath"]  # for the processes tests start
        sys.path[:0] = [request["workdir"], root]
        sys.dont_write_bytecode = True
        os.chdir(root)
        import pytest

        code = int(pytest.main(request["args"]))
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


class _ForkServer:
    """Client side of :func:`_serve` for one work directory."""

    def __init__(self, runner: _Runner, workdir: Path, preload: Path) -> None:
        self.runner = runner
        self.workdir = workdir
        self.proc = subprocess.Popen(
            [
                sys.executable,
                str(Path(__file__).resolve()),
                "--serve",
                str(runner.root),
                str(preload),
            ],
            cwd=runner.root,
            env=runner.env(workdir),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            start_new_session=True,
        )
        self.buffer = b""

    def _line(self, deadline: float | None) -> dict[str, Any] | None:
        fd = self.proc.stdout.fileno()  # type: ignore[union-attr]
        while b"\n" not in self.buffer:
            wait = None if deadline is None else max(0.0, deadline - time.perf_counter())
            ready, _, _ = select.select([fd], [], [], wait)
            if not ready:
                return None
            chunk = os.read(fd, 65536)
            if not chunk:
                raise RuntimeError("the fork server died")
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return json.loads(line)

    def run(self, args: list[str], log: Path, timeout: float | None) -> int | None:
        """The pytest exit code, or None on a timeout (the run is then killed)."""
        request = {
            "args": args,
            "log": str(log),
            "workdir": str(self.workdir),
            "pythonpath": self.runner.env(self.workdir)["PYTHONPATH"],
        }
        self.proc.stdin.write((json.dumps(request) + "\n").encode())  # type: ignore[union-attr]
        self.proc.stdin.flush()  # type: ignore[union-attr]
        pid = self._line(None)["pid"]  # type: ignore[index]
        self.runner.children.add(pid)
        try:
            deadline = None if timeout is None else time.perf_counter() + timeout
            reply = self._line(deadline)
            if reply is None:
                _killpg(pid)
                self._line(None)
                return None
            return int(reply["status"])
        finally:
            self.runner.children.discard(pid)

    def close(self) -> None:
        _killpg(self.proc.pid)
        with contextlib.suppress(Exception):
            self.proc.wait(timeout=5)


def _killpg(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


class _Runner:
    """Runs pytest on a temporary copy of the package; never writes into the working tree."""

    def __init__(self, args: argparse.Namespace, module: Path, tmp: Path) -> None:
        self.args = args
        self.root = Path(args.root).resolve()
        self.module = module
        sys_path_dir, top = _package_root(module)
        self.rel = module.relative_to(sys_path_dir)
        self.top = ".".join(top.relative_to(sys_path_dir).with_suffix("").parts)
        self.tmp = tmp
        self.original = module.read_text(encoding="utf-8")
        self.lock = threading.Lock()
        self.procs: set[subprocess.Popen[bytes]] = set()
        self.children: set[int] = set()
        self.servers: dict[Path, _ForkServer] = {}
        self.free: list[Path] = []
        self.stopping = False
        for k in range(max(1, args.jobs)):
            self.free.append(self._copy(top, tmp / f"w{k}"))

    @staticmethod
    def _copy(top: Path, dest: Path) -> Path:
        dest.mkdir(parents=True)
        if top.is_dir():
            shutil.copytree(top, dest / top.name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(top, dest / top.name)
        return dest

    def env(self, workdir: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(workdir), *filter(None, [env.get("PYTHONPATH")])])
        env["PYTHONDONTWRITEBYTECODE"] = "1"  # no stale .pyc of a same-size mutant, no litter
        env["PYTHONHASHSEED"] = "0"
        env.pop("PYTEST_ADDOPTS", None)
        env.update(extra or {})
        return env

    def pytest(
        self,
        workdir: Path,
        tests: Sequence[str],
        timeout: float | None,
        extra_env: dict[str, str] | None = None,
        plugin: bool = False,
    ) -> tuple[str, float, str]:
        """Run pytest; return ``(outcome, seconds, output)`` with outcome passed/failed/timeout."""
        args = [*_PYTEST_ARGS, *tests]
        t0 = time.perf_counter()
        server = self.servers.get(workdir)
        if server is not None and not plugin:
            log = workdir / "pytest.log"
            code = server.run(args, log, timeout)
            out = log.read_text(encoding="utf-8", errors="replace")
            return self._outcome(code, out), time.perf_counter() - t0, out
        cmd = [sys.executable, "-m", "pytest", *args]
        env = self.env(workdir, extra_env)
        if plugin:
            tools = str(Path(__file__).resolve().parent)
            env["PYTHONPATH"] = os.pathsep.join([env["PYTHONPATH"], tools])
            cmd[3:3] = ["-p", Path(__file__).stem]
        with self.lock:
            if self.stopping:
                raise KeyboardInterrupt
            proc = subprocess.Popen(
                cmd,
                cwd=self.root,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: a timeout kills its children too
            )
            self.procs.add(proc)
        try:
            raw, _ = proc.communicate(timeout=timeout)
            code: int | None = proc.returncode
        except subprocess.TimeoutExpired:
            _killpg(proc.pid)
            raw, _ = proc.communicate()
            code = None
        finally:
            with self.lock:
                self.procs.discard(proc)
        out = raw.decode("utf-8", errors="replace")
        return self._outcome(code, out), time.perf_counter() - t0, out

    @staticmethod
    def _outcome(code: int | None, out: str) -> str:
        if code is None:
            return "timeout"
        if code in (4, 5):  # usage error, nothing collected: a problem of the command, not a kill
            raise RuntimeError(f"pytest exit {code}:\n{out[-3000:]}")
        return "passed" if code == 0 else "failed"

    def stop(self) -> None:
        with self.lock:
            self.stopping = True
            for proc in list(self.procs):
                _killpg(proc.pid)
            for pid in list(self.children):
                _killpg(pid)
            for server in self.servers.values():
                server.close()

    def probe(self, workdir: Path) -> list[str]:
        """Check that the copy is what gets imported; return the modules it imports besides
        itself (what a fork server may import once for all mutants)."""
        dotted = ".".join(self.rel.with_suffix("").parts)
        code = (
            "import importlib, json, sys\n"
            f"m = importlib.import_module({dotted!r})\n"
            "import pytest\n"
            "print(json.dumps([m.__file__, sorted(sys.modules)]))\n"
        )
        res = subprocess.run(
            [sys.executable, "-c", code],
            cwd=self.root,
            env=self.env(workdir),
            capture_output=True,
            text=True,
            check=False,
        )
        try:
            where, names = json.loads(res.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            where, names = "?", []
        if Path(where).resolve() != (workdir / self.rel).resolve():
            raise RuntimeError(
                f"{dotted} imports from {where}, not from the mutated copy; check PYTHONPATH "
                f"({res.stderr.strip()[-500:]})"
            )
        own = (self.top, "tests", "__main__")
        return [n for n in names if not any(n == o or n.startswith(o + ".") for o in own)]

    def baseline(self) -> tuple[dict[str, Any], float]:
        workdir = self.free[0]
        preload = self.probe(workdir)
        cov = self.tmp / "coverage.json"
        extra = {_COVERAGE_ENV: str(cov), _TARGET_ENV: str(workdir / self.rel)}
        outcome, seconds, out = self.pytest(workdir, self.args.tests, None, extra, plugin=True)
        if outcome != "passed":
            raise RuntimeError(f"the tests fail on the unmutated module:\n{out[-4000:]}")
        if self.args.fork:
            path = self.tmp / "preload.json"
            path.write_text(json.dumps(preload), encoding="utf-8")
            for w in self.free:
                self.servers[w] = _ForkServer(self, w, path)
        return json.loads(cov.read_text()), seconds

    def close(self) -> None:
        for server in self.servers.values():
            server.close()

    def run_mutant(self, mutant: Mutant, tests: Sequence[str], timeout: float) -> Result:
        with self.lock:
            workdir = self.free.pop()
        path = workdir / self.rel
        try:
            path.write_text(mutant.source, encoding="utf-8")
            outcome, seconds, out = self.pytest(workdir, tests, timeout)
        finally:
            path.write_text(self.original, encoding="utf-8")
            with self.lock:
                self.free.append(workdir)
        status = {"passed": "survived", "failed": "killed", "timeout": "timeout"}[outcome]
        killed_by = None
        if status == "killed":
            m = re.search(r"^(?:FAILED|ERROR) (\S+)", out, re.MULTILINE)
            killed_by = m.group(1) if m else "(collection or import error)"
        same_files = tests == self.args.tests
        return Result(
            id=mutant.id,
            operator=mutant.operator,
            line=mutant.line,
            diff=mutant.diff,
            status=status,
            seconds=round(seconds, 2),
            tests_run=-1 if same_files else len(tests),
            killed_by=killed_by,
        )


def _select(mutant: Mutant, cov: dict[str, Any]) -> list[str]:
    """The tests to run against a mutant, in the order to run them (``-x`` stops at the first
    failure): those that execute its lines, fastest first, then those that start processes
    (their lines run where the tracer cannot see). Every test when the lines run at import
    (spawning ones first when no test was seen to run them)."""
    durations = cov["durations"]
    spawning = sorted(cov["spawning"], key=lambda t: (durations[t], t))
    lines = set(mutant.lines)
    everything = sorted(durations, key=lambda t: (durations[t], t))
    if lines & set(cov["import"]):
        return everything
    hit = sorted(
        (t for t, ls in cov["hits"].items() if lines & set(ls)), key=lambda t: (durations[t], t)
    )
    if not hit:
        return spawning + [t for t in everything if t not in spawning]
    return hit + [t for t in spawning if t not in hit]


# ----------------------------------------------------------------------------------------------
# Equivalent mutants, results, the table
# ----------------------------------------------------------------------------------------------


def _load_equivalents(path: Path, key: str) -> list[dict[str, str]]:
    if not path.exists():
        return []
    data = json.loads(path.read_text(encoding="utf-8"))
    entries = data.get(key, [])
    for e in entries:
        missing = {"id", "diff", "reason"} - set(e)
        if missing or not e["reason"].strip():
            raise ValueError(f"{path}: entry {e} of {key} needs id, diff and a reason")
    return entries


def _match_equivalents(
    mutants: list[Mutant], entries: list[dict[str, str]]
) -> tuple[dict[str, dict[str, str]], list[str]]:
    """Map mutant id -> entry. An entry matches by id when the diff agrees; else, when the code
    moved, by operator and diff if that is unique. Unmatched entries are returned as stale."""
    by_id = {m.id: m for m in mutants}
    matched: dict[str, dict[str, str]] = {}
    stale = []
    for e in entries:
        m = by_id.get(e["id"])
        if m is not None and m.diff == e["diff"]:
            matched[m.id] = e
            continue
        op = e["id"].split(":", 2)[-1]
        same = [m for m in mutants if m.diff == e["diff"] and m.operator == op]
        if len(same) == 1 and same[0].id not in matched:
            matched[same[0].id] = e
            print(f"note: equivalent entry {e['id']} moved to {same[0].id}; update the file")
        else:
            stale.append(e["id"])
    return matched, stale


def _score(results: list[dict[str, Any]]) -> dict[str, Any]:
    count = {s: sum(r["status"] == s for r in results) for s in _STATUSES}
    total = len(results)
    denominator = total - count["equivalent"]
    detected = count["killed"] + count["timeout"]
    score = 100.0 * detected / denominator if denominator else 100.0
    return {"total": total, **count, "score": round(score, 2)}


_STATUSES = ("killed", "timeout", "survived", "equivalent")


def _table(reports: list[dict[str, Any]]) -> str:
    head = f"{'module':<40} {'total':>5} {'killed':>6} {'timeout':>7} {'surv.':>5} {'equiv.':>6}"
    lines = [head + f" {'score':>7}", "-" * (len(head) + 8)]
    for r in reports:
        s = r["summary"]
        lines.append(
            f"{r['module']:<40} {s['total']:>5} {s['killed']:>6} {s['timeout']:>7} "
            f"{s['survived']:>5} {s['equivalent']:>6} {s['score']:>6.1f}%"
        )
    return "\n".join(lines)


def _print_report(report: dict[str, Any]) -> None:
    print(_table([report]))
    survivors = [r for r in report["mutants"] if r["status"] == "survived"]
    if survivors:
        print(f"\nsurviving mutants of {report['module']}:")
        for r in survivors:
            print(f"  {r['id']:<34} {r['diff']}")
    for r in report["mutants"]:
        if r.get("note"):
            print(f"  note {r['id']}: {r['note']}")
    for s in report["stale_equivalents"]:
        print(f"  stale equivalent entry (no such mutant any more): {s}")


def _run(args: argparse.Namespace) -> int:
    root = Path(args.root).resolve()
    module = (root / args.module).resolve()
    key = module.relative_to(root).as_posix()
    text = module.read_text(encoding="utf-8")
    mutants = generate_mutants(text, str(module))
    if args.only:
        wanted = set(args.only)
        unknown = wanted - {m.id for m in mutants}
        if unknown:
            raise SystemExit(f"unknown mutant ids: {sorted(unknown)}")
        mutants = [m for m in mutants if m.id in wanted]
    if args.list:
        for m in mutants:
            print(f"{m.id:<34} {m.diff}")
        print(f"{len(mutants)} mutants of {key}")
        return 0
    if not args.tests:
        raise SystemExit("--tests is required (the module's own test files)")
    equivalents, stale = _match_equivalents(mutants, _load_equivalents(Path(args.equivalents), key))
    results: list[Result] = []
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mutation-") as tmp:
        runner = _Runner(args, module, Path(tmp))
        try:
            cov, base_seconds = runner.baseline()
            timeout = args.timeout or 2.0 * base_seconds + 20.0
            print(
                f"{key}: {len(mutants)} mutants; baseline {base_seconds:.1f}s, "
                f"timeout {timeout:.0f}s per mutant, {args.jobs} job(s)",
                flush=True,
            )

            def one(m: Mutant) -> Result:
                tests = args.tests if args.all_tests else _select(m, cov)
                return runner.run_mutant(m, tests, timeout)

            pool = ThreadPoolExecutor(max_workers=max(1, args.jobs))
            try:
                for i, res in enumerate(pool.map(one, mutants), 1):
                    if res.id in equivalents:
                        if res.status == "survived":
                            res.status = "equivalent"
                        else:
                            res.note = "listed as equivalent but killed: remove the entry"
                    results.append(res)
                    extra = f" by {res.killed_by}" if res.killed_by else ""
                    print(
                        f"[{i}/{len(mutants)}] {res.id} {res.status} ({res.seconds:.1f}s){extra}",
                        flush=True,
                    )
            finally:
                # On Ctrl-C: drop the queued mutants, kill the running ones, then clean up.
                pool.shutdown(wait=False, cancel_futures=True)
        except KeyboardInterrupt:
            runner.stop()
            print("interrupted; the working tree was never modified", file=sys.stderr)
            return 130
        finally:
            runner.close()
    report = {
        "module": key,
        "tests": list(args.tests),
        "selection": "all" if args.all_tests else "coverage",
        "seconds": round(time.perf_counter() - t_start, 1),
        "summary": _score([r.__dict__ for r in results]),
        "mutants": [r.__dict__ for r in results],
        "stale_equivalents": stale,
        "equivalent_reasons": {i: e["reason"] for i, e in equivalents.items()},
    }
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp_out = out.with_suffix(out.suffix + ".tmp")
        tmp_out.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
        os.replace(tmp_out, out)
    _print_report(report)
    return 0


def _summary(paths: list[str], fail_under: float | None) -> int:
    reports = [json.loads(Path(p).read_text(encoding="utf-8")) for p in paths]
    print(_table(reports))
    for r in reports:
        survivors = [m for m in r["mutants"] if m["status"] == "survived"]
        for m in survivors:
            print(f"  survived {r['module']} {m['id']}: {m['diff']}")
    if fail_under is not None:
        low = [r["module"] for r in reports if r["summary"]["score"] < fail_under]
        if low:
            print(f"below {fail_under}%: {', '.join(low)}")
            return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--module", help="the module to mutate (a .py file)")
    parser.add_argument("--tests", action="append", default=[], help="a test file (repeatable)")
    parser.add_argument("--jobs", type=int, default=1, help="mutants run in parallel (1)")
    parser.add_argument("--out", help="write the JSON results here")
    parser.add_argument("--timeout", type=float, help="seconds per mutant (2 x baseline + 20)")
    parser.add_argument("--root", default=".", help="project root: pytest runs here (.)")
    parser.add_argument(
        "--equivalents", default=str(DEFAULT_EQUIVALENTS), help="the equivalent-mutant list"
    )
    parser.add_argument("--only", action="append", help="run only this mutant id (repeatable)")
    parser.add_argument("--list", action="store_true", help="list the mutants, run nothing")
    parser.add_argument("--all-tests", action="store_true", help="run every test for every mutant")
    parser.add_argument(
        "--no-fork",
        dest="fork",
        action="store_false",
        help="start a fresh interpreter per mutant instead of forking a warm one",
    )
    parser.add_argument("--serve", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--summary", nargs="+", metavar="JSON", help="print the table of results")
    parser.add_argument("--fail-under", type=float, help="with --summary: exit 1 below this score")
    args = parser.parse_args(argv)
    args.fork = args.fork and hasattr(os, "fork")
    if args.serve:
        _serve(*args.serve)
        return 0
    if args.summary:
        return _summary(args.summary, args.fail_under)
    if not args.module:
        parser.error("--module is required")
    return _run(args)


if __name__ == "__main__":
    sys.exit(main())

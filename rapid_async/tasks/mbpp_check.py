"""The trusted MBPP checker: decode a run's results, compare them with expected values we computed.

Runs in our process (the actor's, or evaluation's), never in the sandbox.
`rapid_async.tasks.mbpp_harness` runs inside the sandbox and writes one typed
frame per call; this module parses those frames (`parse_frames`, strict:
anything but exactly the expected frames is a failure) and compares each
value with the expected one (`matches`). Expected values come from the
reference solution, run in its own sandboxed process (MBPP+), or from the
literals of the original MBPP asserts (`parse_assert`); they never enter
the candidate's process.

Comparison (`matches`), on typed values (`canon`):
- exact by default: same structure and types, except that int, float and
  complex compare by value (1 == 1.0); bool is not a number (True != 1),
  tuple != list, set == frozenset, dicts by their items, strings and bytes
  apart. Anything that is not plain data ("x": user classes, subclasses of
  plain types, functions, generators...) equals nothing.
- floats as MBPP+ (EvalPlus) compares them: when exact fails and the task has
  an `atol` (or the expected value is a float or a list / tuple of floats,
  then atol = 1e-6), numbers of the same type within atol + 1e-7 * |expected|,
  element by element for lists and tuples of the same type and length.
- the MBPP+ oracles (EvalPlus' special cases, by entry point): "set_eq"
  (set(out) == set(expected)), "not_none" (the reference's result counts only
  as None / not None; a bool answer must equal that), "or_zero" (0 is also
  accepted), "always" (anything is accepted: such problems are excluded from
  training by default, see `constant_passes`).
- mappings: where the reference itself returns a Counter, OrderedDict or
  defaultdict (Mbpp/88's Counter), the checker turns it into its items on its
  own side and accepts a dict or one of those types with the same items from
  the candidate (EvalPlus compares Counter == dict by items too); elsewhere a
  candidate's Counter is not plain data and fails.
"""

from __future__ import annotations

import ast
import json
import math
import operator

from rapid_async.tasks.mbpp_harness import encode

MBPP_SET_EQ = {"similar_elements", "find_char_long", "common_in_nested_lists", "extract_singly",
               "larg_nnum", "intersection_array", "find_dissimilar", "Diff"}
"""MBPP+ entry points whose output is compared as a set (EvalPlus' MBPP_OUTPUT_SET_EQ_TASKS)."""
ORACLES = {"are_equivalent": "always", "sum_div": "or_zero", "check_str": "not_none",
           "text_match_three": "not_none", "text_starta_endb": "not_none",
           **dict.fromkeys(MBPP_SET_EQ, "set_eq")}
"""MBPP+ entry points whose outputs EvalPlus judges by a special oracle."""
_WRAPPERS = {"set": "set", "int": "int"}
"""Original-MBPP asserts `assert W(f(args)) == literal` that are understood, W -> mode."""
_ARITH = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
          ast.Div: operator.truediv}
_TYPE_NAMES = {t.__name__: t for t in (int, float, str, bool, list, tuple, dict, set)}


class Refused(ValueError):
    """An original-MBPP assert whose shape the checker does not accept."""


# ---------------------------------------------------------------- typed values

def canon(node, mappings: bool = False, depth: int = 0):
    """A hashable, comparable form of a typed value (see the module docstring).

    Raises ValueError on a malformed tree; "x" (and "m" unless `mappings`)
    gives a value equal to nothing.
    """
    kind = type(node)
    if node is None:
        return ("none",)
    if kind is bool:
        return ("bool", node)
    if kind is int or kind is float:
        return ("num", node)
    if kind is str:
        return ("str", node)
    if depth > 200 or kind is not list or not node or type(node[0]) is not str:
        raise ValueError("malformed typed value")
    tag, rest = node[0], node[1:]
    if tag == "i":
        return ("num", int(rest[0], 16))
    if tag == "f":
        return ("num", float.fromhex(rest[0]))
    if tag == "c":
        return ("num", complex(float.fromhex(rest[0]), float.fromhex(rest[1])))
    if tag == "y":
        return ("bytes", bytes.fromhex(rest[0]))
    if tag in ("l", "t"):
        return ("list" if tag == "l" else "tuple", tuple(canon(v, mappings, depth + 1) for v in rest[0]))
    if tag in ("S", "F"):
        return ("set", frozenset(canon(v, mappings, depth + 1) for v in rest[0]))
    if tag == "d" or (tag == "m" and mappings):
        items = rest[-1]
        pairs = frozenset((canon(k, mappings, depth + 1), canon(v, mappings, depth + 1)) for k, v in items)
        if len(pairs) != len(items) or len({k for k, _ in pairs}) != len(items):
            raise ValueError("dict with repeated keys")
        return ("dict", pairs)
    if tag in ("x", "m", "T"):
        return ("nonplain", object())
    raise ValueError(f"unknown tag {tag!r}")


def _close(e, o, atol: float) -> bool:
    """EvalPlus' float check (np.allclose, rtol 1e-7) on canonical values of the same type."""
    if e[0] == "num" and o[0] == "num":
        a, b = e[1], o[1]
        if type(a) is not type(b) or type(a) is complex:
            return False
        if a != a and b != b:  # both NaN
            return True
        return abs(b - a) <= atol + 1e-7 * abs(a)
    if e[0] == o[0] and e[0] in ("list", "tuple") and len(e[1]) == len(o[1]):
        return all(_close(x, y, atol) for x, y in zip(e[1], o[1]))
    return False


def _floats(e) -> bool:
    if e[0] == "num":
        return type(e[1]) is float
    return e[0] in ("list", "tuple") and bool(e[1]) and all(
        x[0] == "num" and type(x[1]) is float for x in e[1])


def _elements(c):
    """The elements of a canonical list / tuple / set as a frozenset, or None."""
    if c[0] in ("list", "tuple", "set"):
        return frozenset(c[1])
    return None


def matches(expected: list, out: list, oracle: str | None = None, atol: float = 0.0,
            mappings: bool = False) -> bool:
    """Whether the candidate's typed result `out` passes against the typed `expected`.

    `oracle`: None (exact + floats), "set_eq", "not_none", "or_zero", "always",
    "int" (int(out) == expected) or ("isclose", rel_tol, abs_tol) (math.isclose).
    """
    try:
        if oracle == "always":
            return True
        if oracle == "not_none":
            want = expected is not None
            return out == want if type(out) is bool else (out is not None) == want
        e, o = canon(expected, True), canon(out, mappings)
        if oracle == "set_eq":
            return _elements(o) is not None and _elements(o) == _elements(e)
        if oracle == "int":
            return o[0] == "num" and type(o[1]) is not complex and math.isfinite(o[1]) \
                and ("num", int(o[1])) == e
        if isinstance(oracle, tuple) and oracle[0] == "isclose":
            return o[0] == "num" == e[0] and type(o[1]) is not complex and \
                math.isclose(o[1], e[1], rel_tol=oracle[1], abs_tol=oracle[2])
        if e == o:
            return True
        if oracle == "or_zero" and o[0] == "num" and o[1] == 0:
            return True
        if atol == 0 and _floats(e):
            atol = 1e-6
        return atol != 0 and _close(e, o, atol)
    except (ValueError, TypeError, IndexError, KeyError, OverflowError, RecursionError):
        return False


def constant_passes(expected: list[list], oracles: list, atol: float = 0.0) -> bool:
    """Whether one constant answer would pass every test (expected[i] judged by oracles[i]):
    "always" and "or_zero" (0) tests pass one anyway; else some expected value must match all."""
    tests = [(e, o) for e, o in zip(expected, oracles) if o not in ("always", "or_zero")]
    return any(all(matches(e, c, o, atol, mappings=True) for e, o in tests) for c, _ in tests) \
        or not tests


# ---------------------------------------------------------------- frames

def parse_frames(stdout: str, n: int) -> tuple[list | None, str]:
    """The `n` typed results of a run's result channel, or (None, reason).

    Strict: exactly R 0 .. R n-1 in order, then "E n", then nothing.
    """
    lines = stdout.split("\n")
    if len(lines) != n + 2 or lines[-1] != "":
        last = lines[-2] if len(lines) > 1 else lines[0]
        if last.startswith(("X ", "L ")):
            return None, "raised " + last.split(" ")[-1][:80]
        return None, f"{len(lines) - 1} frames for {n} calls"
    results = []
    for i, line in enumerate(lines[:n]):
        prefix = f"R {i} "
        if not line.startswith(prefix):
            return None, f"frame {i} is not a result"
        try:
            results.append(json.loads(line[len(prefix):]))
        except (ValueError, RecursionError):
            return None, f"frame {i} is not JSON"
    if lines[n] != f"E {n}":
        return None, "no end frame"
    return results, "ok"


# ---------------------------------------------------------------- original MBPP asserts

def _value(node):
    """A literal argument / expected value: literal_eval, plus constant arithmetic
    (1.0/3), builtin type names (int) and set(...) / tuple(...) of a literal."""
    try:
        return ast.literal_eval(node)
    except ValueError:
        pass
    if isinstance(node, ast.BinOp) and type(node.op) in _ARITH:
        left, right = _value(node.left), _value(node.right)
        if all(type(v) in (int, float) for v in (left, right)):
            return _ARITH[type(node.op)](left, right)
    if isinstance(node, ast.Name) and node.id in _TYPE_NAMES:
        return _TYPE_NAMES[node.id]
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and not node.keywords \
            and node.func.id in ("set", "frozenset", "tuple", "list") and len(node.args) <= 1:
        make = {"set": set, "frozenset": frozenset, "tuple": tuple, "list": list}[node.func.id]
        return make(_value(node.args[0])) if node.args else make()
    raise Refused(f"not a literal: {ast.unparse(node)[:80]}")


def _call(node) -> tuple[str, list]:
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)):
        raise Refused(f"not a call of a function by name: {ast.unparse(node)[:80]}")
    if node.keywords or any(isinstance(a, ast.Starred) for a in node.args):
        raise Refused("keyword or starred arguments")
    return node.func.id, [_value(a) for a in node.args]


def parse_assert(text: str) -> tuple[str, list, list, object]:
    """An original-MBPP test `assert f(args) == literal` as (f, typed args, typed expected, oracle).

    Also understood: `assert literal == f(args)`, `assert set(f(args)) == ...`,
    `assert int(f(args)) == ...` and `assert math.isclose(f(args), literal, rel_tol=, abs_tol=)`.
    Raises Refused for anything else (a test needing the task's setup code,
    non-literal arguments, an expected value computed by code...).
    """
    try:
        tree = ast.parse(text.strip())
    except SyntaxError as exc:
        raise Refused(f"syntax error: {exc}") from None
    if len(tree.body) != 1 or not isinstance(tree.body[0], ast.Assert):
        raise Refused("not a single assert statement")
    test = tree.body[0].test
    if isinstance(test, ast.Call) and ast.unparse(test.func) == "math.isclose" and len(test.args) == 2:
        options = {k.arg: _value(k.value) for k in test.keywords}
        if set(options) - {"rel_tol", "abs_tol"}:
            raise Refused("math.isclose with other options")
        name, args = _call(test.args[0])
        oracle = ("isclose", float(options.get("rel_tol", 1e-9)), float(options.get("abs_tol", 0.0)))
        return name, encode(args), encode(_value(test.args[1])), oracle
    if not (isinstance(test, ast.Compare) and len(test.ops) == 1 and isinstance(test.ops[0], ast.Eq)):
        raise Refused("not `assert call == literal`")
    left, right = test.left, test.comparators[0]
    if not isinstance(left, ast.Call) and isinstance(right, ast.Call):
        left, right = right, left
    oracle = None
    if isinstance(left, ast.Call) and isinstance(left.func, ast.Name) and left.func.id in _WRAPPERS \
            and len(left.args) == 1 and isinstance(left.args[0], ast.Call):
        oracle, left = _WRAPPERS[left.func.id], left.args[0]
    name, args = _call(left)
    expected = _value(right)
    if oracle == "set":
        oracle, expected = "set_eq", set(expected)
    return name, encode(args), encode(expected), oracle

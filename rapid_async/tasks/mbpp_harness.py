"""The test harness that runs inside the sandbox for one MBPP / MBPP+ check.

Not imported by rapid_async at run time: `rapid_async.tasks.mbpp` reads this
file's text, appends a JSON spec and a call to `_main`, and the sandbox runs
the result with `python -I -S` (standard library only).

Two kinds of test, chosen by the spec:
- "inputs" (MBPP+): the reference solution (run first, in its own namespace)
  gives the expected output for every input; then the candidate runs on the
  same inputs (deep copies) and each output must match: exact for most
  values, within `atol` (1e-6 where the reference returns floats) for
  numbers, with the few per-task oracles that MBPP+ defines.
- "asserts" (original MBPP): the task's assert statements run after the
  candidate's code; `assert a == b` is rewritten to the same strict check.

The strict check refuses outputs that contain objects other than plain
Python values (numbers, strings, bytes, None, lists, tuples, dicts, sets),
so an object whose `__eq__` always says yes passes nothing. Success is
proved by printing the run's nonce (read from nonce.txt, which is deleted
before the candidate runs) after the last check; exiting early prints
nothing. Code that digs through this process's own memory could still find
the nonce: the sandbox protects the host, not the reward, from such code.
"""

import ast
import copy
import json
import os
import sys

_PLAIN = (int, float, complex, str, bytes, bool, type(None))
_CONTAINERS = (list, tuple, dict, set, frozenset)


def _plain(value, depth=0):
    """True when `value` holds only plain Python values (no user classes)."""
    if depth > 50:
        return False
    if type(value) in _PLAIN:
        return True
    if type(value) in (list, tuple, set, frozenset):
        return all(_plain(v, depth + 1) for v in value)
    if type(value) is dict:
        return all(_plain(k, depth + 1) and _plain(v, depth + 1) for k, v in value.items())
    return False


def _is_number(value):
    return type(value) in (int, float, bool)


def _close(expected, out, atol):
    """Numbers (or flat sequences of numbers) equal within atol + 1e-7 relative."""
    if _is_number(expected) and _is_number(out):
        if expected != expected and out != out:  # both NaN
            return True
        return abs(out - expected) <= atol + 1e-7 * abs(expected)
    if type(expected) in (list, tuple) and type(out) in (list, tuple) and len(expected) == len(out):
        return all(_close(e, o, atol) for e, o in zip(expected, out))
    return False


def _floats(value):
    if type(value) is float:
        return True
    return type(value) in (list, tuple) and bool(value) and all(type(v) is float for v in value)


def same(expected, out, atol=0.0):
    """The strict check: out is plain and equals expected (numbers within atol)."""
    if _plain(expected) and not _plain(out):
        return False
    if expected == out:
        return True
    if atol == 0 and _floats(expected):
        atol = 1e-6
    return atol != 0 and _close(expected, out, atol)


def _tuples(value, depth):
    """Lists -> tuples down to `depth` levels (0: only the value itself)."""
    if type(value) is not list:
        return value
    if depth == 0:
        return tuple(value)
    return tuple(_tuples(v, depth - 1) for v in value)


def _deep_tuples(value):
    if type(value) is list:
        return tuple(_deep_tuples(v) for v in value)
    return value


def restore(rule, args):
    """Turn one JSON argument list back into the Python types the task expects.

    JSON has no tuples, sets or complex numbers; MBPP+ stores them as lists
    and strings. `rule` names the shape (see RULES in rapid_async.tasks.mbpp).
    """
    if rule == "each_tuple":
        return [tuple(a) for a in args]
    if rule == "each_items_tuple":
        return [[tuple(x) for x in a] for a in args]
    if rule == "first_items_tuple":
        return [[tuple(x) for x in args[0]]] + args[1:]
    if rule == "second_tuple":
        return [args[0], tuple(args[1])] + args[2:]
    if rule == "first_tuple":
        return [tuple(args[0])] + args[1:]
    if rule == "each_tuple_of_tuples":
        return [_tuples(a, 1) for a in args]
    if rule == "first_sets":
        return [[set(x) if type(x) is list and x else {} for x in args[0]]]
    if rule == "float_complex":
        return [float(args[0]), complex(args[1])]
    if rule == "complex":
        return [complex(args[0])]
    if rule == "first_mixed_tuple":
        return [tuple(tuple(x) if type(x) is list else x for x in args[0])] + args[1:]
    if rule == "first_dict_tuples":
        return [{k: tuple(v) for k, v in args[0].items()}] + args[1:]
    if rule == "all_tuples":
        return _deep_tuples(args)
    return args


def _check_inputs(spec, cand):
    ref = {"__name__": "reference"}
    exec(compile(spec["reference"], "reference.py", "exec"), ref)
    inputs = [restore(spec["rule"], a) for a in spec["inputs"]]
    expected = [ref[spec["entry_point"]](*copy.deepcopy(a)) for a in inputs]
    exec(compile(spec["code"], "solution.py", "exec"), cand)
    fn = cand.get(spec["entry_point"])
    if not callable(fn):
        return False
    oracle = spec.get("oracle")
    for args, exp in zip(inputs, expected):
        out = fn(*copy.deepcopy(args))
        if oracle == "always":
            continue
        if oracle == "not_none":
            ok = (out is not None) == (exp is not None)
        elif oracle == "or_zero":
            ok = same(exp, out, spec["atol"]) or (type(out) is int and out == 0)
        else:
            ok = same(exp, out, spec["atol"])
        if not ok:
            return False
    return True


class _StrictAsserts(ast.NodeTransformer):
    """assert a == b  ->  assert __rapid_same(b, a)."""

    def visit_Assert(self, node):
        test = node.test
        if isinstance(test, ast.Compare) and len(test.ops) == 1 and isinstance(test.ops[0], ast.Eq):
            call = ast.Call(ast.Name("__rapid_same", ast.Load()), [test.comparators[0], test.left], [])
            node.test = call
        return node


def _check_asserts(spec, cand):
    exec(compile(spec["code"], "solution.py", "exec"), cand)
    if spec.get("setup"):
        exec(compile(spec["setup"], "setup.py", "exec"), cand)
    tree = ast.fix_missing_locations(_StrictAsserts().visit(ast.parse("\n".join(spec["tests"]))))
    cand["__rapid_same"] = same
    exec(compile(tree, "tests.py", "exec"), cand)
    return True


def _main(spec_json):
    with open("nonce.txt", encoding="utf-8") as f:
        nonce = f.read().strip()
    os.remove("nonce.txt")
    spec = json.loads(spec_json)
    cand = {"__name__": "solution"}
    check = _check_inputs if spec["kind"] == "inputs" else _check_asserts
    if check(spec, cand):
        sys.stdout.flush()
        os.write(1, ("\n" + nonce + "\n").encode())

"""The runner that calls one MBPP program's function inside the sandbox, and its data encoding.

Run by `rapid_async.tasks.mbpp` as the sandbox's main.py (`python -I -S`,
standard library only) with two files beside it: `solution.py` (the code
under test: a model's completion, or the reference solution when the checker
computes expected outputs) and `calls.json` (the calls to make: a list of
[function name, typed-encoded argument list]). Inputs are not secret; no
expected value, reference or nonce is ever in this process or its files:
the trusted checker (`rapid_async.tasks.mbpp_check`, in our process)
compares the results. So whatever the code under test does to this process
(patch builtins, replace this module's functions, walk frames, write fake
results) it can only report outputs it could have returned anyway.

Channel: before the solution is imported, fd 1 is duplicated to a private
descriptor (the result channel) and fd 1 and `sys.stdout` are pointed at
/dev/null, so the solution's prints never reach the channel. One line per
frame, each a JSON value escaped to ASCII (no raw newline inside):
    R <i> <typed value>   the i-th call returned this value
    X <i> <exception type name>   the i-th call raised
    L <exception type name>   the solution failed to load
    E <number of calls>   the run finished
The checker accepts a run only with exactly one R frame per call, in order,
followed by the E frame, and nothing else (see `mbpp_check.parse_frames`).

Typed encoding (`encode` / `decode`): JSON's own null, true / false, integers,
finite floats and strings for None, bool, int (|n| < 2**62), float and str
(JSON keeps these apart: true is not 1, 1.0 is not 1), and a list tagged by
exact type for everything else, so that tuple != list survives the trip:
    ["i", hex int] (larger ints), ["f", float.hex()] (inf, nan),
    ["c", real hex, imag hex], ["y", bytes hex],
    ["l", [...]] list, ["t", [...]] tuple, ["S", [...]] set, ["F", [...]] frozenset,
    ["d", [[k, v], ...]] dict, ["m", "Counter"|"OrderedDict"|"defaultdict", [[k, v], ...]],
    ["T", "int"|"float"|"str"|...] a builtin type passed as an argument (original MBPP),
    ["x", type name] anything else (not plain data: never equal to anything).
Subclasses of plain types (a tuple or dict subclass with its own __eq__) are
"x"; the mapping types are encoded from their real items (dict.items), not
from anything the object's class overrides.
"""

import collections
import json
import os
import sys

MAX_DEPTH = 100
BARE_INT = 1 << 62
"""Nesting deeper than this is not plain data (and stops cycles)."""
_MAPPINGS = {collections.Counter: "Counter", collections.OrderedDict: "OrderedDict",
             collections.defaultdict: "defaultdict"}
_TYPES = {"int": int, "float": float, "str": str, "bool": bool, "list": list, "tuple": tuple,
          "dict": dict, "set": set, "bytes": bytes, "complex": complex}
_SEQ = {list: "l", tuple: "t", set: "S", frozenset: "F"}
_type, _len, _isinstance, _dict_items = type, len, isinstance, dict.items


def encode(value, depth=0):
    """`value` as a typed JSON tree (see the module docstring)."""
    kind = _type(value)
    if depth > MAX_DEPTH:
        return ["x", "too deep"]
    if value is None or kind is bool or kind is str:
        return value
    if kind is int:
        return value if -BARE_INT < value < BARE_INT else ["i", format(value, "x")]
    if kind is float:
        return value if value - value == 0 else ["f", float.hex(value)]  # inf - inf, nan: nan
    if kind is complex:
        return ["c", float.hex(value.real), float.hex(value.imag)]
    if kind is bytes:
        return ["y", bytes.hex(value)]
    if kind in _SEQ:
        return [_SEQ[kind], [encode(v, depth + 1) for v in value]]
    if kind is dict or kind in _MAPPINGS:
        items = [[encode(k, depth + 1), encode(v, depth + 1)] for k, v in _dict_items(value)]
        return ["d", items] if kind is dict else ["m", _MAPPINGS[kind], items]
    if kind is type and value in _TYPES.values():
        return ["T", value.__name__]
    return ["x", getattr(kind, "__name__", "?")[:100]]


def decode(node, depth=0):
    """The Python value of a typed JSON tree; ValueError on anything malformed or "x"."""
    if node is None or _type(node) in (bool, int, float, str):
        return node
    if depth > MAX_DEPTH or not _isinstance(node, list) or not node:
        raise ValueError("not a typed value")
    tag, rest = node[0], node[1:]
    if tag == "i" and rest and _type(rest[0]) is str:
        return int(rest[0], 16)
    if tag == "f" and rest and _type(rest[0]) is str:
        return float.fromhex(rest[0])
    if tag == "c" and _len(rest) == 2:
        return complex(float.fromhex(rest[0]), float.fromhex(rest[1]))
    if tag == "y" and rest and _type(rest[0]) is str:
        return bytes.fromhex(rest[0])
    if tag in ("l", "t", "S", "F") and rest and _type(rest[0]) is list:
        items = [decode(v, depth + 1) for v in rest[0]]
        return {"l": list, "t": tuple, "S": set, "F": frozenset}[tag](items)
    if tag == "d" and rest and _type(rest[0]) is list:
        return {decode(k, depth + 1): decode(v, depth + 1) for k, v in rest[0]}
    if tag == "T" and rest and rest[0] in _TYPES:
        return _TYPES[rest[0]]
    raise ValueError(f"not a plain typed value: {str(node)[:80]}")


def _run(out, calls, source):
    """Load the solution and make every call, writing one frame each to `out`."""
    dumps = json.dumps
    ns = {"__name__": "solution"}
    try:
        exec(compile(source, "solution.py", "exec"), ns)
    except BaseException as exc:  # noqa: B036 - SystemExit too: a failed load, reported
        out.write("L " + dumps(_type(exc).__name__) + "\n")
        return
    for i, (name, args) in enumerate(calls):
        try:
            value = ns[name](*decode(args))
            frame = "R %d %s\n" % (i, dumps(encode(value), separators=(",", ":")))
        except BaseException as exc:  # noqa: B036 - a call that raised is a result
            out.write("X %d %s\n" % (i, dumps(_type(exc).__name__)))
            return
        out.write(frame)
    out.write("E %d\n" % _len(calls))


def main():
    channel = os.dup(1)
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)
    os.close(null)
    sys.stdout = open(os.devnull, "w", encoding="utf-8")
    out = os.fdopen(channel, "w", encoding="ascii", errors="backslashreplace", buffering=1 << 16)
    with open("calls.json", encoding="utf-8") as f:
        calls = json.load(f)
    with open("solution.py", encoding="utf-8") as f:
        source = f.read()
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 4 * MAX_DEPTH))
    _run(out, calls, source)
    out.flush()


if __name__ == "__main__":
    main()

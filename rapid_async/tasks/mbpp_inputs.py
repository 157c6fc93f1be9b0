"""MBPP+ inputs back to Python values, and the problems a constant answer would pass.

Used by `rapid_async.tasks.mbpp` (in our process, never in the sandbox).

JSON has no tuples, sets or complex numbers; MBPP+ stores them as lists and
strings. `restore` turns one stored argument list back into the types the
task expects, by the shape named for its task number in `RULES`; the checker
then sends the arguments typed (`mbpp_harness.encode`) to the sandbox.

`CONSTANT_ORACLES` (the file mbpp_constant_oracles.json beside this module)
lists the MBPP+ problems whose tests one constant answer passes, with why;
`bin/mbpp-constant-oracles` recomputes it from the reference outputs and
tests/test_mbpp.py checks it. For original MBPP the list is computed from the
assert literals when the task loads.
"""

from __future__ import annotations

import json
from pathlib import Path

RULES: dict[str, set[int]] = {
    "each_tuple": {2, 116, 132, 143, 222, 261, 273, 394, 399, 421, 424, 429, 470, 560, 579, 596,
                   616, 630, 726, 740, 744, 809},
    "each_items_tuple": {63, 64, 70, 94, 120, 237, 272, 299, 400, 409, 417, 438, 473, 614, 780},
    "first_items_tuple": {75, 413, 444, 753},
    "second_tuple": {106, 750},
    "first_sets": {115},
    "float_complex": {124},
    "first_tuple": {250, 307, 405, 446, 617, 720, 763, 808},
    "each_tuple_of_tuples": {259, 401, 445},
    "first_mixed_tuple": {278},
    "first_dict_tuples": {722},
    "complex": {252},
    "all_tuples": {580, 615, 791},
}
"""How MBPP+ inputs are restored from JSON (tuples, sets, complex), by task number."""
CONSTANT_ORACLES_FILE = Path(__file__).with_name("mbpp_constant_oracles.json")


def rule_of(task_number: int) -> str:
    """The restore rule of an MBPP+ task number ("none": the JSON values as they are)."""
    return next((name for name, ids in RULES.items() if task_number in ids), "none")


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


def restore(rule: str, args: list) -> list:
    """One JSON argument list as the Python values the task expects (see RULES)."""
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
        return list(_deep_tuples(args))
    return args


def constant_oracles() -> dict[str, str]:
    """MBPP+ task id -> why a constant answer passes all its tests (the committed list)."""
    return json.loads(CONSTANT_ORACLES_FILE.read_text(encoding="utf-8"))["plus"]

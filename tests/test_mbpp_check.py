"""The trusted MBPP checker: typed encoding, comparisons, result frames, assert parsing (no sandbox)."""

from __future__ import annotations

import collections
import json
import math

import pytest

from rapid_async.tasks.mbpp_check import (Refused, constant_passes, matches, parse_assert,
                                          parse_frames)
from rapid_async.tasks.mbpp_harness import decode, encode


def same(expected, out, oracle=None, atol=0.0, mappings=False):
    return matches(encode(expected), encode(out), oracle, atol, mappings)


@pytest.mark.parametrize("value", [None, True, False, 0, -5, 2**200, 1.5, -0.0, math.inf, 1 + 2j, "é\n",
                                   b"\x00", [1, (2, 3)], (), {1: "a", (2,): [3]}, {1, 2},
                                   frozenset({"x"}), [[[]]], int, str])
def test_encoding_round_trips(value):
    assert decode(json.loads(json.dumps(encode(value)))) == value
    assert type(decode(encode(value))) is type(value)


def test_types_are_kept_apart():
    assert same((1, 2), (1, 2)) and not same((1, 2), [1, 2])
    assert not same(True, 1) and not same(1, True) and not same([0], [False])
    assert same(1, 1.0) and same(2.0, 2)  # numbers compare by value, as Python does
    assert same({1, 2}, frozenset({2, 1})) and not same({1, 2}, [1, 2])
    assert same({"a": 1, "b": 2}, {"b": 2, "a": 1}) and not same({"a": 1}, {"a": True})
    assert not same("1", 1) and not same(b"a", "a") and same(None, None) and not same(None, 0)
    assert encode((1, 2.5, "a", None, True)) == ["t", [1, 2.5, "a", None, True]]  # JSON's own types
    assert encode(2**70)[0] == "i" and encode(float("inf"))[0] == "f"


def test_what_is_not_plain_equals_nothing():
    class Any:
        def __eq__(self, other):
            return True

    class T(tuple):
        pass

    assert encode(Any())[0] == "x" and encode(T((1,)))[0] == "x"
    assert not same((1,), T((1,))) and not same([1], [Any()])
    assert encode(collections.Counter("aab"))[0] == "m"
    counter = collections.Counter("aab")
    # a Counter is plain only where the reference itself returns one (mappings=True)
    assert not same({"a": 2, "b": 1}, counter)
    assert same(counter, {"a": 2, "b": 1}, mappings=True)
    assert same(counter, collections.Counter("aba"), mappings=True)
    assert not same(counter, {"a": 2}, mappings=True)
    nested = [1]
    nested.append(nested)
    assert encode(nested)[1][1][1][1][0] == "l"  # cut at MAX_DEPTH, not a crash
    assert not same([1, [1]], nested)


def test_floats_as_evalplus():
    assert same(0.1 + 0.2, 0.3)  # float expected: atol 1e-6
    assert not same(1.0, 1.01) and same(1.0, 1.01, atol=0.05)
    assert same([1.0, 2.0], [1.0000001, 2.0]) and not same([1.0, 2.0], (1.0, 2.0))
    assert same(float("nan"), float("nan"))
    assert not same(1, 1.0000001)  # an int expected: exact (EvalPlus: no atol then)
    assert not same(2.5, 2, atol=1)  # within atol but not the same type


def test_oracles():
    assert same((1, 2, 3), [3, 2, 1, 1], "set_eq") and not same((1, 2), (1,), "set_eq")
    assert not same((1, 2), "12", "set_eq")
    assert same(None, None, "not_none") and same(None, False, "not_none")
    assert same("match", True, "not_none") and same("match", "yes", "not_none")
    assert not same("match", False, "not_none") and not same(None, "x", "not_none")
    assert same(7, 0, "or_zero") and same(7, 7, "or_zero") and not same(7, False, "or_zero")
    assert same(7, "anything", "always")
    assert same(35, 35.0, "int") and same(35, 35.5, "int") and not same(35, 36.0, "int") and not same(35, True, "int")
    assert same(0.5, 0.5004, ("isclose", 1e-3, 0.0)) and not same(0.5, 0.51, ("isclose", 1e-3, 0.0))


def test_constant_passes():
    values = [encode(v) for v in (True, True, True)]
    assert constant_passes(values, [None] * 3)
    assert not constant_passes([encode(v) for v in (True, False)], [None] * 2)
    assert constant_passes([encode(1), encode(2)], ["or_zero"] * 2)
    assert constant_passes([encode("m"), encode("n")], ["not_none"] * 2)
    assert not constant_passes([encode("m"), encode(None)], ["not_none"] * 2)
    assert constant_passes([encode((1, 2)), encode([2, 1])], ["set_eq"] * 2)


def test_frames_are_strict():
    good = 'R 0 ["i","1"]\nR 1 null\nE 2\n'
    assert parse_frames(good, 2) == ([["i", "1"], None], "ok")
    bad = [
        'R 0 ["i","1"]\nE 1\n',  # too few
        'R 0 ["i","1"]\nR 1 ["n"]\nR 1 ["n"]\nE 2\n',  # a repeated frame
        'R 1 ["i","1"]\nR 0 ["n"]\nE 2\n',  # out of order
        'R 0 ["i","1"]\nR 1 ["n"]\n',  # no end
        'R 0 ["i","1"]\nR 1 ["n"]\nE 2\nR 0 ["n"]\n',  # more after the end
        'R 0 ["i","1"]\nR 1 ["n"]\nE 2',  # the end not terminated
        'R 0 ["i","1"]\nR 1 [oops\nE 2\n',  # not JSON
        'X 0 "ValueError"\n',
        '',
    ]
    for text in bad:
        assert parse_frames(text, 2)[0] is None, text
    assert parse_frames('X 0 "ValueError"\n', 2)[1] == 'raised "ValueError"'


def test_parse_assert_shapes():
    assert parse_assert("assert f(1, [2]) == (3, 4)") == ("f", encode([1, [2]]), encode((3, 4)), None)
    assert parse_assert("assert (3, 4) == f(1)")[2] == encode((3, 4))
    assert parse_assert("assert g(10, 5, 1.0/3) == 0.1")[1] == encode([10, 5, 1.0 / 3])
    assert parse_assert("assert g((4, 7.7), int) == [7.7]")[1] == encode([(4, 7.7), int])
    assert parse_assert("assert set(f(1)) == set([1, 2])")[2:] == (encode({1, 2}), "set_eq")
    assert parse_assert("assert int(f(5, 3)) == 35")[3] == "int"
    assert parse_assert("assert math.isclose(f(2), 0.5, rel_tol=0.001)")[3] == ("isclose", 0.001, 0.0)
    for refused in ["assert f(root) == False", "assert f(1) == sys.getsizeof(1)",
                    "assert f([Pair(1, 2)], 4) == 3", "assert f(1)", "x = 1", "assert f(1) != 2",
                    "assert f(*a) == 1", "assert f(x=1) == 1", "assert obj.f(1) == 2",
                    "assert f(2 ** 99999) == 1", "assert f(1) == 2; import os"]:
        with pytest.raises(Refused):
            parse_assert(refused)

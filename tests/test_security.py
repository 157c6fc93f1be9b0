"""Tests for rapid_async.wire.security: the loopback rule and CURVE keys."""

from __future__ import annotations

import pytest
import zmq

from rapid_async.wire.security import check_secure, is_loopback, new_curve_keys


@pytest.mark.parametrize(
    "where, expected",
    [("127.0.0.1", True), ("tcp://127.0.0.1:5555", True), ("tcp://[::1]:5", True), ("localhost", True),
     ("ipc:///tmp/x", True), ("0.0.0.0", False), ("*", False), ("tcp://10.0.0.2:5", False), ("gpu-node-3", False)],
)
def test_is_loopback(where, expected):
    assert is_loopback(where) is expected


def test_check_secure_allows_loopback_curve_or_explicit_opt_out():
    check_secure("tcp://127.0.0.1:5", curve=False, allow_insecure=False)
    check_secure("0.0.0.0", curve=True, allow_insecure=False)
    check_secure("0.0.0.0", curve=False, allow_insecure=True)
    with pytest.raises(ValueError, match="0.0.0.0 is not a loopback address"):
        check_secure("0.0.0.0", curve=False, allow_insecure=False)


@pytest.mark.skipif(not zmq.has("curve"), reason="libzmq without CURVE")
def test_new_curve_keys_are_distinct_z85_pairs():
    a, b = new_curve_keys(), new_curve_keys()
    assert len(a.public) == len(a.secret) == 40 and a.public != b.public
    assert zmq.curve_public(a.secret) == a.public

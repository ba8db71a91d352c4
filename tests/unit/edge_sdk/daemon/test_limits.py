"""The daemon's bounds that need no server: in-flight admission and the repeated-log-line filter."""

from __future__ import annotations

import logging

import pytest

from edge_sdk.daemon.limits import Admission, Busy, RepeatFilter, raise_open_files_limit


def test_admission_bounds_each_model_and_releases_on_errors() -> None:
    admission = Admission(2)
    with admission.admit("a"), admission.admit("a"):
        with pytest.raises(Busy, match=r"model 'a' already has 2 requests in flight \(server.max_in_flight = 2\)"):
            with admission.admit("a"):
                pass
        with admission.admit("b"):  # another model has its own bound
            assert admission.in_flight("b") == 1
    with pytest.raises(ValueError):
        with admission.admit("a"):
            raise ValueError("a failing request")
    assert admission.in_flight("a") == 0 and admission.refused == 1


def test_repeated_lines_are_suppressed_and_counted() -> None:
    clock = [0.0]
    repeat = RepeatFilter(burst=3, window_s=10, clock=lambda: clock[0])

    def record(msg: str) -> logging.LogRecord:
        return logging.LogRecord("asyncio", logging.ERROR, __file__, 1, msg, None, None)

    passed = [repeat.filter(record("socket.accept() out of system resource")) for _ in range(1000)]
    assert sum(passed) == 3
    assert repeat.filter(record("another message"))  # other lines are not held back
    clock[0] = 11.0
    late = record("socket.accept() out of system resource")
    assert repeat.filter(late) and "[repeated 997 more times in the previous 10 s]" in late.getMessage()


def test_the_open_files_limit_is_raised_to_the_hard_limit() -> None:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(256, hard), hard))
        assert raise_open_files_limit() == (hard, hard) or hard == resource.RLIM_INFINITY
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

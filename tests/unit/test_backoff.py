"""The retry wait of SPEC.md: backoffSeconds * 2^n, capped by maxBackoffSeconds and 7 days."""

from __future__ import annotations

import pytest

from workorder_operator.backoff import HARD_CEILING_SECONDS, retry_delay

WEEK = 7 * 24 * 3600


def test_defaults_wait_120_240_480_seconds() -> None:
    assert [retry_delay(60, n) for n in (1, 2, 3)] == [120, 240, 480]


def test_base_scales_the_wait() -> None:
    assert [retry_delay(5, n) for n in (1, 2, 3)] == [10, 20, 40]


def test_max_backoff_caps_one_wait() -> None:
    assert retry_delay(60, 1, max_backoff_seconds=300) == 120  # below the cap: untouched
    assert retry_delay(60, 3, max_backoff_seconds=300) == 300
    assert retry_delay(60, 10, max_backoff_seconds=300) == 300


def test_hard_ceiling_is_seven_days() -> None:
    assert HARD_CEILING_SECONDS == WEEK
    assert retry_delay(60, 20) == WEEK
    # A cap above the ceiling does not lift it.
    assert retry_delay(60, 20, max_backoff_seconds=10 * WEEK) == WEEK
    # Just below the ceiling nothing is cut: 60 * 2^13 = 491520 s.
    assert retry_delay(60, 13) == 491520


# Without the exponent's clamp, 2**(10**18) never finishes: the timeout is a hang guard, not a
# performance target (those live in `make bench`).
@pytest.mark.timeout(30)
@pytest.mark.parametrize("retry", [64, 1_000, 10**9, 10**18])
def test_huge_retry_numbers_stay_at_the_ceiling(retry: int) -> None:
    assert retry_delay(60, retry) == WEEK
    assert retry_delay(1, retry, max_backoff_seconds=30) == 30


def test_wait_never_shrinks_as_retries_grow() -> None:
    waits = [retry_delay(7, n, max_backoff_seconds=100_000) for n in range(0, 200)]
    assert waits == sorted(waits)
    assert waits[-1] == 100_000

"""Backoff: full jitter under a doubling cap. Seeded or scripted randomness, and a sleep
that only records: nothing here waits."""

from __future__ import annotations

import random

import pytest

from fedstream.client.retry import Backoff

from .fakes import UpperBound


def test_ceilings_double_from_base_up_to_the_cap() -> None:
    rng = UpperBound()
    backoff = Backoff(base=0.5, cap=30.0, rng=rng)
    delays = [backoff.next_delay() for _ in range(10)]
    assert delays == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0, 30.0]
    assert all(low == 0.0 for low, _ in rng.ranges)  # full jitter: every draw from zero


def test_delays_are_uniform_draws_below_the_ceiling() -> None:
    backoff = Backoff(base=0.5, cap=8.0, rng=random.Random(7))
    reference = random.Random(7)
    for attempt in range(12):
        ceiling = min(8.0, 0.5 * 2**attempt)
        assert backoff.ceiling() == ceiling
        delay = backoff.next_delay()
        assert delay == reference.uniform(0.0, ceiling)
        assert 0.0 <= delay <= ceiling


def test_jitter_spreads_the_delays_at_the_cap() -> None:
    backoff = Backoff(base=1.0, cap=10.0, rng=random.Random(3))
    backoff.attempt = 10
    delays = [backoff.next_delay() for _ in range(200)]
    assert max(delays) <= 10.0
    assert min(delays) < 1.0 and max(delays) > 9.0  # not all at the cap, not all near zero
    assert 4.0 < sum(delays) / len(delays) < 6.0


def test_the_cap_holds_however_long_the_retrying() -> None:
    """Thousands of failures in a row (hours of an unreachable coordinator) stay at the cap;
    an unbounded 2**attempt would overflow a float after 1023."""
    rng = UpperBound()
    backoff = Backoff(base=0.5, cap=30.0, rng=rng)
    delays = [backoff.next_delay() for _ in range(3000)]
    assert max(delays) == 30.0
    assert delays[-1] == 30.0
    assert backoff.ceiling() == 30.0


def test_a_cap_below_the_base_bounds_even_the_first_delay() -> None:
    backoff = Backoff(base=2.0, cap=1.0, rng=UpperBound())
    assert [backoff.next_delay() for _ in range(3)] == [1.0, 1.0, 1.0]


def test_reset_restarts_from_the_base() -> None:
    backoff = Backoff(base=0.25, cap=30.0, rng=UpperBound())
    for _ in range(6):
        backoff.next_delay()
    assert backoff.ceiling() == 16.0
    backoff.reset()
    assert backoff.ceiling() == 0.25
    assert [backoff.next_delay() for _ in range(3)] == [0.25, 0.5, 1.0]


def test_sleep_waits_the_delay_it_draws() -> None:
    slept: list[float] = []
    backoff = Backoff(base=0.5, cap=4.0, rng=random.Random(11), sleep=slept.append)
    returned = [backoff.sleep() for _ in range(5)]
    assert slept == returned
    assert backoff.attempt == 5
    reference = random.Random(11)
    assert returned == [reference.uniform(0.0, c) for c in (0.5, 1.0, 2.0, 4.0, 4.0)]


@pytest.mark.parametrize("attempt", [0, 1, 1023, 1024, 10**6])
def test_ceiling_is_finite_and_bounded_at_any_attempt(attempt: int) -> None:
    backoff = Backoff(base=0.5, cap=30.0)
    backoff.attempt = attempt
    assert 0.0 < backoff.ceiling() <= 30.0

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llem import units
from llem.units import FIRST, GAP, OK, RESET, WRAP, counter_delta

RANGE = 262_143_328_850


def test_first_read_has_no_energy():
    assert counter_delta(None, 5) == units.CounterDelta(0, FIRST)


def test_forward_step():
    assert counter_delta(100, 250, RANGE) == units.CounterDelta(150, OK)


def test_wrap_with_known_range():
    d = counter_delta(RANGE - 10, 5, RANGE)
    assert d == units.CounterDelta(15, WRAP)
    assert d.has_data


def test_backwards_without_range_is_reset_not_negative():
    d = counter_delta(1_000_000, 10)
    assert d == units.CounterDelta(0, RESET)
    assert not d.has_data


def test_wrap_that_implies_impossible_power_is_a_reset():
    # 1 s apart, the "wrap" would mean ~262 kJ in one second.
    d = counter_delta(1_000, 500, RANGE, elapsed_s=1.0, max_power_w=1000)
    assert d.kind == RESET and d.delta == 0


def test_forward_jump_that_implies_impossible_power_is_a_gap():
    d = counter_delta(0, 10**20, elapsed_s=1.0, max_power_w=1000)
    assert d == units.CounterDelta(0, GAP)


def test_reads_too_far_apart_to_rule_out_several_wraps_are_a_gap():
    # 1000 W for 300 s is more than one range: a second wrap could hide in there.
    d = counter_delta(0, 1_000, RANGE, elapsed_s=300.0, max_power_w=1000)
    assert d.kind == GAP


def test_value_above_range_is_not_a_wrap():
    assert counter_delta(RANGE + 5, 3, RANGE).kind == RESET


def test_negative_counter_is_refused():
    with pytest.raises(ValueError):
        counter_delta(-1, 3)


def test_backwards_clock_is_a_gap():
    assert counter_delta(1, 3, RANGE, elapsed_s=-1.0, max_power_w=100).kind == GAP


@settings(max_examples=300, deadline=None)
@given(
    max_range=st.integers(min_value=1_000, max_value=2**64),
    steps=st.lists(st.integers(min_value=0, max_value=2**64), min_size=1, max_size=40),
)
def test_random_sequences_never_negative_never_more_than_a_range(max_range, steps):
    prev = None
    for raw in steps:
        cur = raw % (max_range + 1)
        d = counter_delta(prev, cur, max_range)
        assert 0 <= d.delta <= max_range
        assert d.kind in units.KINDS
        if d.kind in (FIRST, RESET, GAP):
            assert d.delta == 0
        prev = cur


@settings(max_examples=300, deadline=None)
@given(
    start=st.integers(min_value=0, max_value=RANGE),
    increments=st.lists(st.integers(min_value=0, max_value=RANGE // 3), min_size=1, max_size=50),
)
def test_wrapping_counter_sums_to_the_true_energy(start, increments):
    """A counter advanced by known amounts (each less than a range) is recovered exactly."""
    prev, cur, total = start, start, 0
    for inc in increments:
        cur = (cur + inc) % RANGE
        d = counter_delta(prev, cur, RANGE)
        assert d.kind in (OK, WRAP)
        total += d.delta
        prev = cur
    assert total == sum(increments)


@settings(max_examples=200, deadline=None)
@given(
    values=st.lists(st.integers(min_value=0, max_value=10**15), min_size=2, max_size=30),
    elapsed=st.floats(min_value=0.0, max_value=3600.0),
)
def test_with_power_bound_energy_is_never_implausible(values, elapsed):
    for prev, cur in zip(values, values[1:]):
        d = counter_delta(prev, cur, None, elapsed_s=elapsed, max_power_w=700.0)
        assert 0 <= d.delta <= 700.0 * elapsed * 1e6

"""The shapes of a repair's reads (`agent.fetch.windowed`): a hop that damages a body at the same place
each time (a byte at a fixed fraction of every Nth body) must hit two reads of one part at different
bytes of the part, so that two damaged reads can never agree. A body's very first or last byte is not
covered (see `windowed`)."""

from __future__ import annotations

from fractions import Fraction

import pytest

from agent.engines.base import Part
from agent.fetch import REPAIR_ROUNDS, repair_part_size, repair_parts, windowed
from agent.manifest import DEFAULT_PART_SIZE

FRACTIONS = [Fraction(1, 3), Fraction(1, 2), Fraction(2, 3), Fraction(1, 7), Fraction(9, 10), Fraction(1, 64),
             Fraction(63, 64)]


def hit(part: Part, fraction: Fraction) -> int | None:
    """The byte of the part a hop damages at `fraction` of the request's body (None: in the window)."""
    start, length = part.offset - part.lead, part.lead + part.length + part.trail
    at = start + int(fraction * length)
    return at - part.offset if part.offset <= at < part.offset + part.length else None


@pytest.mark.parametrize("size", [8 * DEFAULT_PART_SIZE, 3 * DEFAULT_PART_SIZE + 12345, 1000])
@pytest.mark.parametrize("fraction", FRACTIONS, ids=str)
def test_no_two_reads_of_a_part_are_damaged_at_the_same_byte(size: int, fraction: Fraction) -> None:
    for part in repair_parts(size, DEFAULT_PART_SIZE):
        shapes = [part] + [windowed(part, size, r) for r in range(1, REPAIR_ROUNDS + 1)]
        bytes_hit = [b for b in (hit(s, fraction) for s in shapes) if b is not None]
        assert len(bytes_hit) == len(set(bytes_hit)), (size, part, bytes_hit)


@pytest.mark.parametrize("size", [2 * DEFAULT_PART_SIZE + 5, 1000])
def test_windows_stay_in_the_blob_on_one_side_and_cost_little(size: int) -> None:
    for part in repair_parts(size, DEFAULT_PART_SIZE):
        for r in range(1, REPAIR_ROUNDS + 1):
            read = windowed(part, size, r)
            assert (read.offset, read.length) == (part.offset, part.length)
            assert read.lead <= read.offset and read.offset + read.length + read.trail <= size
            assert (read.lead == 0) != (read.trail == 0)  # one side only
            assert read.lead + read.trail <= r * max(64, part.length // 64)


def test_a_blob_of_one_part_is_compared_in_two_halves() -> None:
    assert repair_part_size(1000, DEFAULT_PART_SIZE) == 500
    assert [(p.offset, p.length) for p in repair_parts(1001, DEFAULT_PART_SIZE)] == [(0, 501), (501, 500)]
    assert repair_part_size(5 * DEFAULT_PART_SIZE, DEFAULT_PART_SIZE) == DEFAULT_PART_SIZE

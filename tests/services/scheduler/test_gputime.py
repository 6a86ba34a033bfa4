"""The split of a batch's GPU time among its rows: exact, proportional and deterministic."""

from __future__ import annotations

import pytest

from services.scheduler.gputime import split


@pytest.mark.parametrize(
    ("total", "weights", "parts"),
    [
        (1000, [1], [1000]),  # a batch of one gets the whole
        (1000, [1, 1, 1], [334, 333, 333]),  # a tie: the leftover goes to the earlier row
        (10, [1, 2, 3, 4], [1, 2, 3, 4]),
        # shares 1.87 1.03 1.45 0.97 1.69: floors 1 1 1 0 1, three left for rows 3, 0 and 4
        (7, [31, 17, 24, 16, 28], [2, 1, 1, 1, 2]),
        (5, [0, 0], [3, 2]),  # no tokens at all: evenly
        (0, [3, 4], [0, 0]),
        (12_345, [0, 9, 1], [0, 11_111, 1_234]),  # a row that processed nothing gets nothing
    ],
)
def test_a_split_is_exact_and_follows_the_weights(
    total: int, weights: list[int], parts: list[int]
) -> None:
    assert split(total, weights) == parts
    assert sum(parts) == total


def test_every_split_adds_up_and_no_part_is_a_unit_off_its_share() -> None:
    for total in (0, 1, 999, 31_456, 10**12 + 7):
        for weights in ([5, 3, 2], [1] * 32, [256, 1, 17, 0, 64], list(range(1, 20))):
            parts = split(total, weights)
            assert sum(parts) == total
            for part, weight in zip(parts, weights, strict=True):
                assert abs(part - total * weight / sum(weights)) < 1
    assert split(17, []) == []
    with pytest.raises(ValueError):
        split(5, [1, -1])

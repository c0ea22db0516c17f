"""run_support.flip_margin, the proof the server test asks of a row that differs from the replay: the replay's
router probabilities of the experts the program and the replay chose differently."""
from __future__ import annotations

import numpy as np

from run_support import flip_margin

PROBS = np.array([0.30, 0.20, 0.199999, 0.15, 0.149995, 0.001], dtype=np.float32)


def test_equal_rows_have_no_margin() -> None:
    assert flip_margin(PROBS, (0, 1, 2), (0, 1, 2)) == 0.0


def test_boundary_swap_is_the_router_margin() -> None:
    """k = 4: the 4th (0.15) and 5th (0.149995) expert swapped: the gap between the k-th and (k+1)-th."""
    assert abs(flip_margin(PROBS, (0, 1, 2, 4), (0, 1, 2, 3)) - 5e-6) < 1e-7


def test_order_swap_inside_the_top_k_is_their_gap() -> None:
    assert abs(flip_margin(PROBS, (0, 2, 1, 3), (0, 1, 2, 3)) - 1e-6) < 1e-7


def test_a_wrong_expert_is_far_from_a_tie() -> None:
    assert flip_margin(PROBS, (0, 1, 2, 5), (0, 1, 2, 3)) > 0.1

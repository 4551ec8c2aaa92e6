import pytest

from tapo.core.trajectory import Trajectory


def test_trajectory_rejects_spans_that_do_not_tile():
    with pytest.raises(ValueError, match="tile"):
        Trajectory("abc", (0, 1), (2, 2), (2, 3), 0.5)

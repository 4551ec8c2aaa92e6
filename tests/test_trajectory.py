import pytest

from tapo.core.splice import splice_trajectory
from tapo.core.trajectory import CONTROLS, Trajectory, ablate_trajectory, build_trajectory

WRONG = "23 + 45 = 68\n68 - 12 = 50\nThe answer is \\boxed{50}"
RIGHT = "23 + 45 = 68\n68 - 12 = 56\nThe answer is \\boxed{56}"


def test_trajectory_rejects_spans_that_do_not_tile():
    with pytest.raises(ValueError, match="tile"):
        Trajectory("abc", (0, 1), (2, 2), (2, 3), 0.5)


def test_build_trajectory_spans_and_prefix_fraction():
    t = build_trajectory("ab", "c", "de", wrong_length=8)
    assert t == Trajectory("abcde", (0, 2), (2, 3), (3, 5), 0.25)
    assert build_trajectory("", "c", "d", wrong_length=0).prefix_fraction == 0.0


def test_no_prefix_is_the_correct_sibling_alone():
    t = splice_trajectory(WRONG, RIGHT)
    control = ablate_trajectory(t, RIGHT + "\n", "no_prefix")
    assert control == Trajectory(RIGHT, (0, 0), (0, 0), (0, len(RIGHT)), 0.0)
    with pytest.raises(ValueError, match="reference"):
        ablate_trajectory(t, " \n", "no_prefix")


def test_no_reflection_joins_the_prefix_and_the_correction():
    t = splice_trajectory(WRONG, RIGHT)  # "23 + 45 = 68" | "\nWait, ... there." | "\n68 - 12 = 56\n..."
    control = ablate_trajectory(t, RIGHT, "no_reflection")
    assert control.parts() == ("23 + 45 = 68", "", "\n68 - 12 = 56\nThe answer is \\boxed{56}")
    assert control.text == RIGHT and control.prefix_fraction == t.prefix_fraction


@pytest.mark.parametrize(
    "parts, expected",
    [
        (("x = 5", "\nWait, 5 is wrong\n", "x = 6"), ("x = 5", "", "\nx = 6")),  # the seam: the reflection's newline
        (("x =", "Wait, no.", "6"), ("x =", "", "\n6")),  # no whitespace anywhere: a newline
        (("x = 5 ", "Wait, no.", "x = 6"), ("x = 5 ", "", "x = 6")),  # the prefix already ends with a space
        (("", "Wait, the first step is wrong.", "\n2 + 2 = 4"), ("", "", "2 + 2 = 4")),  # no prefix: no seam
    ],
)
def test_no_reflection_seams(parts, expected):
    a, b = len(parts[0]), len(parts[0]) + len(parts[1])
    t = Trajectory("".join(parts), (0, a), (a, b), (b, len("".join(parts))), 0.5)
    control = ablate_trajectory(t, "unused", "no_reflection")
    assert control.parts() == expected and control.reflection_span[0] == control.reflection_span[1]


def test_unknown_control_is_rejected():
    assert CONTROLS == ("no_prefix", "no_reflection")
    with pytest.raises(ValueError, match="control"):
        ablate_trajectory(splice_trajectory(WRONG, RIGHT), RIGHT, "no_correction")

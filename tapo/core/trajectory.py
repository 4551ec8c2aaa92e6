"""The micro-reflective trajectory `prefix + reflection + correction`, shared by the splice and synthesis assembly.

  prefix      a verbatim prefix of the policy's wrong rollout, cut at its first critical error (before or after the
              erroneous step, see CUTS). It is always sliced from the wrong rollout itself, never from a model's copy.
  reflection  one short natural-language diagnosis at the point of the error ("Wait, 23 + 45 = 63 is wrong: ...").
  correction  corrected reasoning from there to the right final answer.
"""

from dataclasses import dataclass

# Where the prefix is cut. "before_error": it stops before the first erroneous step, so the reflection names a claim
# the trajectory itself never made. "after_error": it keeps the erroneous step and reflects right after it (the other
# reading of "retain the erroneous reasoning up to the point of failure").
CUTS = ("before_error", "after_error")


def check_cut(cut: str) -> None:
    if cut not in CUTS:
        raise ValueError(f"cut must be one of {CUTS}, got {cut!r}")


@dataclass(frozen=True)
class Trajectory:
    """text == prefix + reflection + correction; the spans are (start, end) char offsets into text that tile it."""

    text: str
    prefix_span: tuple[int, int]
    reflection_span: tuple[int, int]
    correction_span: tuple[int, int]
    prefix_fraction: float  # kept prefix chars / len(wrong rollout)

    def __post_init__(self):
        bounds = (*self.prefix_span, *self.reflection_span, *self.correction_span)
        tiled = bounds[0] == 0 and bounds[1] == bounds[2] and bounds[3] == bounds[4] and bounds[5] == len(self.text)
        if not tiled or list(bounds) != sorted(bounds):
            raise ValueError(f"Trajectory spans {bounds} do not tile a text of {len(self.text)} chars")

    def parts(self) -> tuple[str, str, str]:
        """(prefix, reflection, correction) as strings."""
        spans = (self.prefix_span, self.reflection_span, self.correction_span)
        return tuple(self.text[start:end] for start, end in spans)


def build_trajectory(prefix: str, reflection: str, correction: str, wrong_length: int) -> Trajectory:
    """The trajectory made of three consecutive parts; `wrong_length` is the wrong rollout's length in chars."""
    a, b = len(prefix), len(prefix) + len(reflection)
    return Trajectory(
        text=prefix + reflection + correction,
        prefix_span=(0, a),
        reflection_span=(a, b),
        correction_span=(b, b + len(correction)),
        prefix_fraction=len(prefix) / wrong_length if wrong_length else 0.0,
    )


# Controls that say where a gain comes from (a constructed row rewritten, same advantage and loss weight):
# "no_prefix" is the correct sibling alone (if TAPO gains only as much, the gain is "more positive samples");
# "no_reflection" is the wrong prefix followed directly by the correction (the reflection sentence's share).
CONTROLS = ("no_prefix", "no_reflection")


def ablate_trajectory(trajectory: Trajectory, reference: str, control: str) -> Trajectory:
    """The control version of a constructed trajectory; its spans stay consistent with its text.

    no_prefix      text = the reference (the correct sibling rollout, trailing whitespace dropped), all correction;
                   empty prefix and reflection, prefix_fraction 0.
    no_reflection  text = prefix + correction, the reflection span empty. The seam keeps the steps apart: when the
                   prefix ends and the correction starts without whitespace, the reflection's leading whitespace (or
                   a newline) joins them, as part of the correction; with an empty prefix the correction's leading
                   whitespace is dropped. prefix_fraction unchanged.
    """
    if control not in CONTROLS:
        raise ValueError(f"control must be one of {CONTROLS}, got {control!r}")
    if control == "no_prefix":
        if not isinstance(reference, str) or not reference.strip():
            raise ValueError(f"ablate_trajectory(no_prefix): the reference must be non-empty text, got {reference!r:.80}")
        text = reference.rstrip()
        return Trajectory(text, (0, 0), (0, 0), (0, len(text)), prefix_fraction=0.0)
    prefix, reflection, correction = trajectory.parts()
    if not prefix:
        correction = correction.lstrip()
    elif not prefix[-1].isspace() and not correction[:1].isspace():
        correction = (reflection[: len(reflection) - len(reflection.lstrip())] or "\n") + correction
    end, text = len(prefix), prefix + correction
    return Trajectory(text, (0, end), (end, end), (end, len(text)), trajectory.prefix_fraction)

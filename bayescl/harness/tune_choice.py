"""How ``bayescl tune`` chooses among its scored candidates (step 3 of the protocol in :mod:`bayescl.harness.tune`).

The highest validation score wins; with ``min_learned`` only the candidates that learned every task to that
validation accuracy right after training it may win, so that a recipe cannot score by not learning.
"""

from __future__ import annotations

import math

__all__ = ["choose", "choose_learned", "learned_min"]

#: without ``min_learned``, warn when the choice learns some task this much worse than the best learner does
_LEARNED_GAP = 0.05


def choose(scores: dict[str, float], eligible: set[str] | None = None) -> str:
    """The candidate with the highest validation score; the first in grid order on a tie (NaN never wins).

    ``eligible`` restricts the choice to those candidates (when it holds at least one of them).

    >>> choose({"a": 0.9, "b": 0.95, "c": 0.95})
    'b'
    >>> choose({"a": 0.9, "b": 0.95}, eligible={"a"})
    'a'
    """
    if not scores:
        raise ValueError("scores is empty; there is no candidate to choose.")
    if eligible and eligible & set(scores):
        scores = {k: v for k, v in scores.items() if k in eligible}
    return max(scores, key=lambda k: (scores[k] == scores[k], scores[k] if scores[k] == scores[k] else 0.0))


def choose_learned(scores: dict[str, float], learned: dict[str, float], min_learned: float | None,
                   log) -> tuple[str, set[str] | None]:
    """The choice (:func:`choose` among the candidates that learned every task to ``min_learned``, when given) and
    the eligible set; logs the choice, and warns of a choice that may score by not learning."""
    eligible = None if min_learned is None else {n for n, v in learned.items() if v >= min_learned}
    best = choose(scores, eligible)
    log(f"choice: {best} (validation accuracy {100 * scores[best]:.2f})")
    if eligible is not None and not eligible:
        log(f"  warning: no candidate learned every task to {100 * min_learned:g} % (min_learned); chosen among all "
            "of them")
    top = max(v for v in learned.values() if not math.isnan(v))
    if min_learned is None and learned[best] < top - _LEARNED_GAP:
        log(f"  warning: the choice learns some task to only {100 * learned[best]:.1f} % right after training it, "
            f"where another candidate learns every task to {100 * top:.1f} %: it may score by not learning; "
            "--min-learned makes such candidates ineligible")
    skipped = [n for n, v in scores.items() if v > scores[best] and n not in (eligible or set(scores))]
    if skipped:
        log(f"  {len(skipped)} candidate(s) scored higher but left a task below min_learned: {', '.join(skipped)}")
    return best, eligible


def learned_min(val_matrices: list[list[list[float]]]) -> float:
    """The lowest validation accuracy of a task right after it was trained, over tasks and seeds (``V[s][j][j]``)."""
    return min(float(V[j][j]) for V in val_matrices for j in range(len(V)))

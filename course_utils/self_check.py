"""Self-checks for the lessons' exercises: the learner's number against one the lesson computes.

An exercise that has a number to find ends with a cell like::

    MY_ANSWER = None  # TODO: your value
    check_answer("KL(π* || π_ref) at β = 0.1", MY_ANSWER, expected=toy.kl(...).item(), rel=0.01,
                 hint="Eq. 4 with β = 0.1, then the KL of section 2")

The expected value is computed in that cell from the lesson's own objects, never typed in, so the check holds
on every preset. ``check_answer`` prints a verdict and never raises: ``make course`` runs the lessons with every
``MY_ANSWER`` still ``None``, and an unanswered exercise is not an error.
"""

from __future__ import annotations

import math
from numbers import Real


def check_answer(name: str, given, expected, *, rel: float = 1e-2, abs_tol: float = 0.0, hint: str = "") -> bool | None:
    """Compare the learner's ``given`` with ``expected``; print the verdict and return it (``None``: not answered).

    Numbers match within ``rel`` (relative) or ``abs_tol`` (absolute), whichever is looser; anything else
    (a string, a bool, a tuple) must be equal. Strings compare case- and space-insensitively.
    """
    if given is None:
        print(f"{name}: not answered yet. Set your value and run this cell again.")
        return None
    if isinstance(expected, Real) and not isinstance(expected, bool):
        if not isinstance(given, Real) or isinstance(given, bool):
            print(f"{name}: expected a number, got {type(given).__name__} {given!r}.")
            return False
        ok = math.isclose(float(given), float(expected), rel_tol=rel, abs_tol=abs_tol)
        detail = f"{float(given):.4g}"
    elif isinstance(expected, str):
        ok = isinstance(given, str) and " ".join(given.lower().split()) == " ".join(expected.lower().split())
        detail = repr(given)
    else:
        ok = given == expected
        detail = repr(given)
    if ok:
        print(f"{name}: {detail} is right.")
    else:
        print(f"{name}: {detail} is not it yet." + (f" Hint: {hint}" if hint else ""))
    return ok

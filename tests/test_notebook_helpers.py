"""``course_utils.notebook``: the library-notice filter every lesson's versions cell applies, and Results."""

from __future__ import annotations

import json
import logging
import warnings

from course_utils.notebook import QUIET_LOGGERS, Results, quiet_library_warnings


def _shown(category, module, message="notice"):
    """Whether a warning issued from ``module`` survives the lesson filter (filters restored afterwards)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_library_warnings()
        warnings.warn_explicit(message, category, "file.py", 1, module=module)
    return bool(caught)


def test_library_deprecations_are_hidden():
    assert not _shown(FutureWarning, "transformers.modeling_utils")  # TRL calling a renamed transformers property
    assert not _shown(DeprecationWarning, "trl.trainer.dpo_trainer")
    assert not _shown(UserWarning, "tqdm.auto", "IProgress not found. Please update jupyter and ipywidgets.")


def test_course_and_non_deprecation_warnings_still_show():
    assert _shown(UserWarning, "course_utils.data")  # dropped / cut rows must reach the learner
    assert _shown(FutureWarning, "course_utils.train")  # even a deprecation, when the course raises it
    assert _shown(FutureWarning, "__main__")  # the learner's own cells
    assert _shown(UserWarning, "transformers.generation.utils")  # a library's real warning is not a deprecation
    assert _shown(FutureWarning, "transformers_extra")  # the pattern matches whole package names only


def test_quiet_loggers_drop_below_error():
    levels = {name: logging.getLogger(name).level for name in QUIET_LOGGERS}
    try:
        quiet_library_warnings()
        assert all(logging.getLogger(name).getEffectiveLevel() == logging.ERROR for name in QUIET_LOGGERS)
        assert logging.getLogger("course_utils").getEffectiveLevel() < logging.ERROR
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


def test_results_are_written_as_they_are_recorded(tmp_path):
    results = Results("00_demo", tmp_path)
    results.record("win_rate", 0.75)
    results.record("bad", float("nan"))  # JSON has no NaN: stored as null
    stored = json.loads((tmp_path / "results" / "00_demo.json").read_text())
    assert stored["win_rate"] == 0.75 and stored["bad"] is None and "elapsed_seconds" in stored

"""Every use of Ray's private or developer API, in one place (tests/test_layout.py finds any
other).

- `trial_error`: the exception Tune pickled for an errored trial, read from
  `Trial.pickled_error_file` (a developer-API attribute; Tune's public results carry the
  error as text only, and the search re-raises the original type, e.g. a `TrialFailed`).
"""

from __future__ import annotations

import os
from typing import Any

__all__ = ["trial_error"]


def trial_error(trial: Any) -> BaseException | None:
    """The exception Tune saved for an errored trial (None when it saved none, or it does not
    unpickle here)."""
    try:
        import cloudpickle

        path = trial.pickled_error_file
        if path and os.path.isfile(path):
            with open(path, "rb") as f:
                return cloudpickle.load(f)
    except Exception:  # an error that does not unpickle here: report the death
        pass
    return None

"""`python -m automl_cxr` is the `automl-cxr` command."""

from __future__ import annotations

import sys

from automl_cxr.cli import main

sys.exit(main())

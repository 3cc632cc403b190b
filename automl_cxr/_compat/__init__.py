"""Private APIs of the libraries automl-cxr builds on, one module per library, below every
layer (tests/test_layout.py fails on a use anywhere else):

- `optuna`: storages' internals, trial ids, heartbeats, one-transaction attribute writes,
  optuna-dashboard notes and artifact records;
- `timm`: buffer-aware stage grouping, a model module's checkpoint filter;
- `torch`: the CPU bfloat16 query, a fast module clone;
- `ray`: the exception Tune pickled for an errored trial.

Each helper says what it reaches into; when a library changes one, only its module changes.
Import the library's module directly (`from automl_cxr._compat.torch import clone_module`):
this package imports none of them itself.
"""

"""The esmloc_metrics `evaluate` module. It is loaded from its file by `esmloc.evaluation.load_metric` (evaluate
imports metric scripts by path); this `__init__.py` only makes setuptools ship the folder as a regular package."""

"""Fixtures of the pipeline tests (defined in pipeline_testing.py)."""

from pipeline_testing import digits_prepared, project  # noqa: F401

"""Fixtures of the reliability tests (defined in tests/pipeline/pipeline_testing.py, re-exported by
reliability_testing.py)."""

from reliability_testing import digits_prepared, project  # noqa: F401

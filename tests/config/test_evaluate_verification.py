"""``evaluate.verification.bins`` and ``evaluate.verification.fars`` (issue 25): defaults that keep
older params files valid and today's FARs, and each wrong value one error naming its key."""

from __future__ import annotations

import pytest
from pipeline_testing import shipped_raw

from angular.config import ConfigError, parse_params
from angular.eval.verification import DEFAULT_FARS


def verification_of(**keys):
    raw = shipped_raw()
    raw["evaluate"]["verification"].update(keys)
    return parse_params(raw).evaluate.verification


def test_defaults_keep_older_params_files_valid_and_todays_fars():
    raw = shipped_raw()
    for key in ("bins", "fars"):
        raw["evaluate"]["verification"].pop(key, None)
    config = parse_params(raw).evaluate.verification
    assert config.bins == () and config.fars == DEFAULT_FARS == (1e-1, 1e-2, 1e-3)


def test_sets_and_fars_as_given():
    config = verification_of(
        bins=["sets/lfw.bin", "sets/cfp_fp.bin", "agedb_30.bin"],
        fars=[1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1],
    )
    assert config.bins == ("sets/lfw.bin", "sets/cfp_fp.bin", "agedb_30.bin")
    assert config.fars == (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
    assert all(type(far) is float for far in verification_of(fars=[1e-3]).fars)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("bins", "lfw.bin", "must be a list of verification set files"),
        ("bins", [1], "must be a list of verification set files"),
        ("bins", [" "], "must be a list of verification set files"),
        ("bins", ["a/lfw.bin", "b/lfw.bin"], "names two sets 'lfw'"),
        ("bins", None, "must be a list of verification set files"),
        ("fars", [], "must be a non-empty list of false accept rates"),
        ("fars", 1e-3, "must be a non-empty list of false accept rates"),
        ("fars", [0.0], "must be false accept rates in (0, 1), got 0.0"),
        ("fars", [1e-3, 1.0], "must be false accept rates in (0, 1), got 1.0"),
        ("fars", [True], "must be false accept rates in (0, 1), got True"),
        ("fars", ["1e-3"], "must be false accept rates in (0, 1), got '1e-3'"),
        ("fars", [1e-3, 1e-3], "lists a false accept rate twice"),
    ],
)
def test_a_bad_value_is_one_error_naming_its_key(key, value, message):
    with pytest.raises(ConfigError) as caught:
        verification_of(**{key: value})
    assert caught.value.key == f"evaluate.verification.{key}"
    assert message in caught.value.problem and "\n" not in str(caught.value)

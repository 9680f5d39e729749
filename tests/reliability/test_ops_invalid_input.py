"""Every invalid argument of ``angular.ops`` raises a Python exception naming the argument, on every
backend, and never crashes the interpreter: the cases (the table in ``tests/test_ops_api.py``) run in a
subprocess, so a segfault or an abort in a kernel fails this test instead of killing pytest.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

CASES_FILE = Path(__file__).resolve().parents[1] / "test_ops_api.py"

# Loads the case table by path (the tests folder is not a package) and runs every case in one process.
RUNNER = textwrap.dedent(
    """
    import importlib.util, json, sys
    spec = importlib.util.spec_from_file_location("ops_api_cases", sys.argv[1])
    cases = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cases)
    report = {"backend": cases.ops.backend(), "results": cases.run_invalid_cases()}
    print(json.dumps(report))
    """
)


def load_case_table():
    spec = importlib.util.spec_from_file_location("ops_api_cases", CASES_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("backend_choice", ["default", "python"])
def test_invalid_arguments_raise_in_a_subprocess(backend_choice):
    env = dict(os.environ)
    env.pop("ANGULAR_BACKEND", None)
    if backend_choice != "default":
        env["ANGULAR_BACKEND"] = backend_choice
    result = subprocess.run(
        [sys.executable, "-c", RUNNER, str(CASES_FILE)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, (
        f"the case runner exited with {result.returncode} (a negative code is a signal: a crash)\n"
        f"stdout:\n{result.stdout[-2000:]}\nstderr:\n{result.stderr[-4000:]}"
    )
    report = json.loads(result.stdout.strip().splitlines()[-1])
    if backend_choice == "python":
        assert report["backend"] == "python"
    results = report["results"]
    expected = [case[0] for case in load_case_table().invalid_cases()]
    assert sorted(results) == sorted(expected), "the subprocess did not run every case"
    silent = {case: r for case, r in results.items() if r["error"] is None}
    assert not silent, f"backend {report['backend']}: no exception for {sorted(silent)}"
    unnamed = {
        case: (r["argument"], r["error"], r["message"])
        for case, r in results.items()
        if not r["names_argument"]
    }
    assert not unnamed, (
        f"backend {report['backend']}: message does not name the argument: {unnamed}"
    )

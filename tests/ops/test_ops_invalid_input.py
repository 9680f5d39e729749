"""Every invalid argument of ``angular.ops`` raises a Python exception naming the argument, on every
backend, and never crashes the interpreter: the cases (the table in ``tests/ops/test_ops_api.py``) run in a
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
import torch

CASES_FILE = Path(__file__).resolve().parent / "test_ops_api.py"

# Loads the case table by path (the tests folder is not a package) and runs every case in one process.
# With "cuda" every tensor the table makes is a CUDA tensor (the default device), so the cases reach
# the CUDA backend; the table's one mixed-device case is replaced by both mixes, made explicitly.
RUNNER = textwrap.dedent(
    """
    import importlib.util, json, sys
    import torch
    spec = importlib.util.spec_from_file_location("ops_api_cases", sys.argv[1])
    cases = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cases)
    results = {}
    # On CUDA, labels >= C is a device-side assert (no host sync; it kills the context): tested in
    # tests/ops/test_fused_cuda.py, in a process of its own.
    CUDA_ASYNC = ("device-cuda-cos-cpu-labels", "label-equal-C", "label-above-C")
    if sys.argv[2] == "cuda":
        torch.set_default_device("cuda")
        ops = cases.ops
        for op in (ops.margin_logits, ops.margin_cross_entropy):
            for cos_device, labels_device in (("cpu", "cuda"), ("cuda", "cpu")):
                case = f"{op.__name__}-cos-{cos_device}-labels-{labels_device}"
                cos = torch.rand(4, 5, device=cos_device)
                labels = torch.randint(0, 5, (4,), device=labels_device)
                try:
                    op(cos, labels, s=64.0)
                except Exception as error:
                    results[case] = dict(argument="labels", error=type(error).__name__,
                                         message=str(error),
                                         names_argument=cases.names_argument(str(error), "labels"))
                else:
                    results[case] = dict(argument="labels", error=None, message="",
                                         names_argument=False)
    if sys.argv[2] == "cuda":
        every = cases.invalid_cases
        cases.invalid_cases = lambda: [c for c in every() if not any(a in c[0] for a in CUDA_ASYNC)]
    table = cases.run_invalid_cases()
    if sys.argv[2] == "cuda":
        assert cases._cos().is_cuda, "the table's tensors are not on CUDA"
    results.update(table)
    print(json.dumps({"backend": cases.ops.backend(), "results": results}))
    """
)


def load_case_table():
    spec = importlib.util.spec_from_file_location("ops_api_cases", CASES_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


CUDA = pytest.param(
    "cuda",
    marks=[
        pytest.mark.cuda,
        pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU"),
    ],
)


@pytest.mark.parametrize("backend_choice", ["default", "python", CUDA])
def test_invalid_arguments_raise_in_a_subprocess(backend_choice):
    env = dict(os.environ)
    env.pop("ANGULAR_BACKEND", None)
    if backend_choice == "python":
        env["ANGULAR_BACKEND"] = backend_choice
    device = "cuda" if backend_choice == "cuda" else "cpu"
    result = subprocess.run(
        [sys.executable, "-c", RUNNER, str(CASES_FILE), device],
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
    if device == "cuda":
        skipped = ("device-cuda-cos-cpu-labels", "label-equal-C", "label-above-C")
        expected = [case for case in expected if not any(s in case for s in skipped)] + [
            f"{op}-cos-{a}-labels-{b}"
            for op in ("margin_logits", "margin_cross_entropy")
            for a, b in (("cpu", "cuda"), ("cuda", "cpu"))
        ]
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

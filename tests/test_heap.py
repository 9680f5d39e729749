"""angular.heap: a freed 64 MiB buffer is reused without page faults once the thresholds are set,
as a training step reuses its (B, C) buffers (each case in a fresh process, so that no earlier
allocation shapes the heap)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

SCRIPT = """
import json, resource, sys
import torch
from angular import heap
kept = heap.keep_freed_buffers_mapped() if sys.argv[1] == "keep" else False
def faults_of_one_buffer():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    buffer = torch.empty(16 * 1024 * 1024)  # 64 MiB of fp32, above glibc's 32 MiB cap
    buffer.fill_(1.0)  # touch every page
    del buffer
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
for _ in range(6):  # the heap grows around the first buffers and Python's small objects
    faults_of_one_buffer()
print(json.dumps({"kept": kept, "faults": [faults_of_one_buffer() for _ in range(5)]}))
"""

PAGES = 64 * 1024 * 1024 // 4096  # pages of one buffer


def run(mode: str, **env) -> dict:
    environment = {key: value for key, value in os.environ.items() if not key.startswith("MALLOC_")}
    environment.update(env)
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, mode],
        env=environment, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_a_freed_buffer_is_reused_without_faulting_its_pages_again():
    default = run("default")
    kept = run("keep")
    assert kept["kept"] is True
    # Without the setting every buffer is a fresh mapping: each page faults again.
    assert min(default["faults"]) > PAGES // 2, default
    # With it the freed block stays in the heap and is handed out again.
    assert max(kept["faults"]) < PAGES // 20, kept


def test_the_switch_and_the_users_own_environment_leave_the_heap_alone():
    assert run("keep", ANGULAR_KEEP_HEAP="0")["kept"] is False
    assert run("keep", MALLOC_TRIM_THRESHOLD_="2147483647")["kept"] is False

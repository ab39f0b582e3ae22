"""Every test of ``tests/interp`` (the Triton kernels under Triton's interpreter), each reported here by name.

They need ``TRITON_INTERPRET=1`` before triton is first imported, so they run in one child pytest process; this
module collects their ids from it, runs them once, and turns each child result into a test of this session.
"""

import functools
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ENV = dict(os.environ, TRITON_INTERPRET="1")


def _child(*args, timeout):
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "tests/interp", *args], cwd=ROOT,
                          env=ENV, capture_output=True, text=True, timeout=timeout)


@functools.cache
def _ids() -> list[str]:
    p = _child("--collect-only", "-q", timeout=300)
    ids = [line[len("tests/interp/"):] for line in p.stdout.splitlines() if line.startswith("tests/interp/")]
    return ids or [f"collection failed: {p.stdout[-1500:]}{p.stderr[-1500:]}"]


@functools.cache
def _results(junit: str) -> dict[str, tuple[str, str]]:
    """{"<file stem>::<test name>": (outcome, message)} of one child run of every interpreter test."""
    p = _child("-q", f"--junitxml={junit}", timeout=1800)
    if not Path(junit).exists():
        raise AssertionError(f"the interpreter tests did not run:\n{p.stdout[-3000:]}{p.stderr[-3000:]}")
    out = {}
    for case in ET.parse(junit).iter("testcase"):
        name = f"{case.get('classname').rsplit('.', 1)[-1]}.py::{case.get('name')}"
        outcome, message = "passed", ""
        for kind in ("failure", "error", "skipped"):
            el = case.find(kind)
            if el is not None:
                outcome, message = kind, f"{el.get('message', '')}\n{el.text or ''}"
                break
        out[name] = (outcome, message)
    return out


@pytest.mark.parametrize("test", _ids())
def test_under_the_interpreter(test, tmp_path_factory):
    junit = str(tmp_path_factory.getbasetemp() / "interp-junit.xml")
    outcome, message = _results(junit).get(test, ("missing", "not in the child run's results"))
    if outcome == "skipped":
        pytest.skip(message)
    assert outcome == "passed", f"{test}: {outcome}\n{message[-4000:]}"

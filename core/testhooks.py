"""Named gates that let a test stop a job at a known point instead of racing it with sleeps.

A gate does nothing unless the environment variable LAB_TEST_GATE_DIR names a folder (only tests
set it) and the test armed that gate by creating <folder>/<name>.armed. The first arrival then
consumes the arming, writes <folder>/<name>.reached and blocks until the test creates
<folder>/<name>.release. Files work across processes: the app, its job threads and the children
it starts (fine-tuning) all see the same folder through the inherited environment.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

GATE_ENV = "LAB_TEST_GATE_DIR"
POLL_SECONDS = 0.05


def gate(name: str, timeout: float = 600.0) -> None:
    """Block here while a test holds the gate `name` (see the module docstring); else return."""
    root = os.environ.get(GATE_ENV)
    if not root:
        return
    folder = Path(root)
    try:
        (folder / f"{name}.armed").unlink()
    except FileNotFoundError:
        return
    tmp = folder / f"{name}.reached.tmp"
    tmp.write_text(str(os.getpid()), encoding="utf-8")
    os.replace(tmp, folder / f"{name}.reached")  # the test reads the pid whole, never half
    release = folder / f"{name}.release"
    end = time.monotonic() + timeout
    while not release.exists():
        if time.monotonic() > end:
            raise TimeoutError(f"test gate '{name}' was never released")
        time.sleep(POLL_SECONDS)
    release.unlink()

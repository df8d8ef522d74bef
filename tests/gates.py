"""The test side of core.testhooks: arm a named gate, wait until a job reaches it, release it."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable


class Gate:
    def __init__(self, folder: Path, name: str) -> None:
        self.folder, self.name = Path(folder), name
        self.folder.mkdir(parents=True, exist_ok=True)

    def _file(self, suffix: str) -> Path:
        return self.folder / f"{self.name}.{suffix}"

    def arm(self) -> "Gate":
        """The next job to arrive at the gate stops there."""
        self._file("reached").unlink(missing_ok=True)
        self._file("armed").touch()
        return self

    def wait_reached(self, timeout: float = 300, alive: Callable[[], bool] = lambda: True) -> int:
        """Block until a job stopped at the gate; returns the pid of the process that did.
        `alive()` turning false (the job ended before it got there) fails at once."""
        end = time.monotonic() + timeout
        while not self._file("reached").exists():
            if time.monotonic() > end:
                raise TimeoutError(f"nothing reached gate '{self.name}' in {timeout:.0f} s")
            if not alive():
                raise AssertionError(f"the job ended before it reached gate '{self.name}'")
            time.sleep(0.05)
        return int(self._file("reached").read_text())

    def release(self) -> None:
        self._file("release").touch()

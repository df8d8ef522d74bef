"""Start the real app (python app.py) on a free loopback port for gradio_client and browser tests."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A loopback port nothing listens on (also usable as a 'closed' port for error tests)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def app_process(data_dir: Path, timeout: float = 180,
                env: dict[str, str] | None = None) -> Iterator[tuple[str, subprocess.Popen]]:
    """The app's URL and process while it runs (a test may kill it); `env` adds settings (e.g.
    SQL_TIMEOUT_S, a test-gate folder)."""
    port = free_port()
    env = {**os.environ, "DATA_DIR": str(data_dir), "GRADIO_SERVER_PORT": str(port),
           "GRADIO_SERVER_NAME": "127.0.0.1", **(env or {})}
    log = open(data_dir / "app.log", "w")
    proc = subprocess.Popen([sys.executable, "app.py"], cwd=REPO, env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        end = time.time() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"app exited early:\n{(data_dir / 'app.log').read_text()}")
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except OSError:
                if time.time() > end:
                    raise TimeoutError(f"app did not start:\n{(data_dir / 'app.log').read_text()}")
                time.sleep(0.5)
        yield url, proc
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@contextmanager
def running_app(data_dir: Path, timeout: float = 180, env: dict[str, str] | None = None):
    """The app's URL while it runs; `env` adds settings (e.g. SQL_TIMEOUT_S, a test-gate folder)."""
    with app_process(data_dir, timeout, env) as (url, _):
        yield url

"""Child processes of subprocess jobs: start them in their own process group, tied to the app, and
stop a group a previous app left behind without ever touching a process that is not ours.

- spawn() starts the command as the leader of a new session (its pid is its process group id),
  so cancel and clean-up reach every process it starts (`accelerate launch` workers too). On Linux
  the child also asks the kernel for SIGTERM when its parent dies (PR_SET_PDEATHSIG): a trainer
  does not outlive an app that was killed. The signal follows the thread that started the child,
  which is the job's runner thread: it lives until the child ends.
- A group recorded by an app that died is killed only if one of its processes still carries the
  job's id in its environment (LAB_JOB_ID, read from /proc): a recycled pid belongs to someone
  else and is left alone. Without /proc (not Linux) nothing can be checked and nothing is killed.
"""
from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

from jobs.events import JOB_ENV

logger = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1
PROC = Path("/proc")
KILL_WAIT_SECONDS = 10.0


def _libc_prctl():
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


# Looked up once here: between fork and exec the child must do as little as possible.
_PRCTL = _libc_prctl()
_SIGTERM = int(signal.SIGTERM)


def _die_with_parent(parent: int) -> None:
    """preexec_fn: SIGTERM this child when the parent dies (and now if it already has)."""
    _PRCTL(PR_SET_PDEATHSIG, _SIGTERM, 0, 0, 0)
    if os.getppid() != parent:
        os.kill(os.getpid(), _SIGTERM)


def spawn(argv: list[str], env: dict[str, str], cwd: Path, log: IO[str]) -> subprocess.Popen:
    """Start `argv` as a new process group with stdout and stderr into `log`."""
    parent = os.getpid()
    preexec = (lambda: _die_with_parent(parent)) if _PRCTL is not None else None
    return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                            env=env, cwd=cwd, start_new_session=True, preexec_fn=preexec)


def _group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes whose process group is `pgid`."""
    members = []
    for entry in PROC.iterdir() if PROC.is_dir() else ():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue  # gone meanwhile
        if fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(int(entry.name))
    return members


def _runs_job(pid: int, job_id: str) -> bool:
    """Whether process `pid` was started for job `job_id` (its environment says so)."""
    try:
        environ = (PROC / str(pid) / "environ").read_bytes()
    except OSError:  # gone, or not ours to read
        return False
    return f"{JOB_ENV}={job_id}".encode() in environ.split(b"\0")


def kill_orphan(pgid: int, job_id: str, wait: float = KILL_WAIT_SECONDS) -> bool:
    """Stop process group `pgid` if it still runs job `job_id`: SIGTERM, then SIGKILL after
    `wait` seconds. Returns whether it killed anything."""
    members = _group_members(pgid)
    if not any(_runs_job(pid, job_id) for pid in members):
        if members:
            logger.warning("process group %s of job %s now belongs to another program; left alone",
                           pgid, job_id)
        return False
    logger.warning("stopping process group %s left running by job %s", pgid, job_id)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        signal_group(pgid, sig)
        end = time.monotonic() + wait
        while _group_members(pgid):
            if time.monotonic() > end:
                break
            time.sleep(0.05)
        else:
            return True
    logger.error("process group %s of job %s survived SIGKILL", pgid, job_id)
    return True


def signal_group(pgid: int, sig: int) -> None:
    """Send `sig` to every process of group `pgid` (nothing if the group is gone)."""
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass

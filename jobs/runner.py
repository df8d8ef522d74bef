"""Background jobs: progress, ETA, cancel, resume, and a record that outlives the browser page.

A job is a row in the jobs table plus a folder (data dir /jobs/<id>/) holding its log. Two kinds:
- thread jobs run inside the app process (evaluation: it shares the loaded models and the DuckDB
  connection, and writes rows as it goes);
- subprocess jobs run a command (fine-tuning: crash isolation, `accelerate launch`). The child never
  opens the database (DuckDB allows one writer process); it appends events to the job's events
  file (jobs.events, whose Reporter is the child's side) that this runner turns into progress
  updates and a result; its stdout and stderr go to the log. The child's pid and process group
  are stored with the job while it runs (jobs.procs starts it and can stop it).
A job that was running when the app stopped is marked interrupted on the next start, after its
process group, if a child still runs it, is stopped; `resume` runs it again with resume=True, and
the job itself skips the work it already finished.
Keys a visitor typed reach a thread job as `secrets` (endpoint -> core.secrets.Secret): held in
memory for that run only, never in the job's record, and dropped when it ends.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from core import config
from core.records import JobRecord
from core.secrets import Secret
from core.store import Store, now
from jobs import procs
from jobs.events import EVENTS_ENV, EVENTS_FILE, JOB_ENV, EventReader, read_result, result_path

logger = logging.getLogger(__name__)

EVENT_POLL_SECONDS = 0.1
TERMINAL = ("done", "failed", "cancelled", "interrupted")
MAX_ERROR_CHARS = 500  # of a job's one-line error


class JobCancelled(Exception):
    """Raised inside a thread job when the user asked to cancel it."""


class JobError(ValueError):
    """A user-facing problem with a job request (unknown id, wrong state)."""


def job_dir(job_id: str) -> Path:
    """The job's folder (log, events, metrics); made when the job is launched, so a read of a job
    that never ran finds nothing rather than creating it."""
    return config.subdir("jobs") / job_id


class _Progress:
    """Turns fractions into throttled store updates with an ETA. The rate is measured from the
    first step forward in this attempt, so loading time does not inflate it, and there is no
    ETA until a second step gives one."""

    def __init__(self, store: Store, job_id: str, start_fraction: float):
        self.store, self.job_id = store, job_id
        self.f0 = start_fraction
        self.first_step: tuple[float, float] | None = None  # (time, fraction) of the first advance
        self.last_write = 0.0
        self.eta_written = False

    def update(self, fraction: float, message: str = "") -> None:
        fraction = min(max(fraction, 0.0), 1.0)
        t = time.monotonic()
        if self.first_step is None and fraction > self.f0:
            self.first_step = (t, fraction)
        eta = None
        if self.first_step is not None and fraction > self.first_step[1]:
            t1, f1 = self.first_step
            eta = (t - t1) / (fraction - f1) * (1.0 - fraction)
        first_eta = eta is not None and not self.eta_written
        if t - self.last_write < 0.25 and fraction < 1.0 and not first_eta:
            return
        self.last_write, self.eta_written = t, self.eta_written or eta is not None
        self.store.update_job(self.job_id, progress=fraction, message=message, eta_seconds=eta)


@dataclass
class JobContext:
    """What a thread job gets: report progress, log, notice cancellation, and the keys its
    visitor typed (endpoint -> Secret; emptied when the run ends)."""

    job_id: str
    spec: dict[str, Any]
    resume: bool
    _progress: _Progress
    _cancel: threading.Event
    log_path: Path
    secrets: Mapping[str, Secret] = field(default_factory=dict)

    def progress(self, fraction: float, message: str = "") -> None:
        self.check_cancelled()
        self._progress.update(fraction, message)

    def log(self, line: str) -> None:
        with self.log_path.open("a", encoding="utf-8") as fh:
            fh.write(line.rstrip("\n") + "\n")

    def metric(self, **values: Any) -> None:
        _append_metric(self.job_id, values)

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def check_cancelled(self) -> None:
        if self._cancel.is_set():
            raise JobCancelled()


ThreadFn = Callable[[JobContext], dict[str, Any] | None]
ArgvFn = Callable[[dict[str, Any], bool], list[str]]


@dataclass
class JobKind:
    """How to run one kind of job: exactly one of `thread` or `argv` is set. `on_done(job_id,
    result)` runs in the app process after success (a subprocess job's records go in there).
    `slot=False`: a thread job that only starts other jobs and waits for them (a study) runs
    beside the concurrency limit instead of inside it; holding a slot while it waits for jobs
    that need one would deadlock as soon as such jobs filled every slot."""

    thread: ThreadFn | None = None
    argv: ArgvFn | None = None
    on_done: Callable[[str, dict[str, Any]], None] | None = None
    slot: bool = True


class JobRunner:
    def __init__(self, store: Store, kinds: dict[str, JobKind], max_concurrent: int = 1):
        self.store, self.kinds = store, kinds
        self._slots = threading.Semaphore(max_concurrent)
        self._cancel: dict[str, threading.Event] = {}
        self._procs: dict[str, subprocess.Popen] = {}
        self._threads: dict[str, threading.Thread] = {}
        # Interrupted first: a runner still watching such a child (two apps on one database,
        # as in the tests) then sees the record taken over and leaves it be (_finish).
        self.interrupted_on_start = store.mark_interrupted()
        self.stopped_on_start = [job.id for job in store.job_processes()
                                 if self._stop_orphan(job)]

    # -- public API -------------------------------------------------------------------------
    def register(self, kind: str, how: JobKind) -> None:
        """Add a kind of job (the wiring registers each once, before the first start)."""
        self.kinds[kind] = how

    def get(self, job_id: str) -> JobRecord:
        """The job's record; JobError for an unknown id."""
        return self._job(job_id)

    def jobs(self, kind: str | None = None, limit: int = 100) -> list[JobRecord]:
        """The newest jobs first (all kinds, or one)."""
        return self.store.list_jobs(kind, limit)

    def start(self, kind: str, spec: dict[str, Any],
              secrets: Mapping[str, Secret] | None = None) -> str:
        """`secrets` go to a thread job's context for this run only, never into its record."""
        if kind not in self.kinds:
            raise JobError(f"Unknown job kind '{kind}'. Known: {', '.join(sorted(self.kinds))}.")
        self._check_secrets(kind, secrets)
        job_id = self.store.create_job(kind, spec)
        self._launch(job_id, kind, spec, resume=False, secrets=secrets)
        return job_id

    def resume(self, job_id: str, secrets: Mapping[str, Secret] | None = None) -> str:
        job = self._job(job_id)
        if job.status not in ("failed", "cancelled", "interrupted"):
            raise JobError(f"Job {job_id} is {job.status}; only a stopped job can be resumed.")
        if job.pgid is not None:
            self._stop_orphan(job)
        self._check_secrets(job.kind, secrets)
        self.store.update_job(job_id, status="queued", error=None, finished_at=None,
                              message="resuming")
        self._launch(job_id, job.kind, job.spec, resume=True, secrets=secrets)
        return job_id

    def cancel(self, job_id: str) -> None:
        job = self._job(job_id)
        if job.status in TERMINAL:
            raise JobError(f"Job {job_id} already ended ({job.status}).")
        self._cancel.setdefault(job_id, threading.Event()).set()
        proc = self._procs.get(job_id)
        if proc and proc.poll() is None:
            procs.signal_group(proc.pid, signal.SIGTERM)

    def wait(self, job_id: str, timeout: float | None = None) -> JobRecord:
        thread = self._threads.get(job_id)
        if thread:
            thread.join(timeout)
        return self._job(job_id)

    @staticmethod
    def metrics(job_id: str) -> list[dict[str, Any]]:
        """Metric points the job reported so far (e.g. step and loss), oldest first."""
        path = job_dir(job_id) / "metrics.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()
                if line.strip()]

    def log_tail(self, job_id: str, lines: int = 40) -> str:
        path = job_dir(job_id) / "log.txt"
        if not path.exists():
            return ""
        with path.open(encoding="utf-8", errors="replace") as fh:
            return "".join(deque(fh, maxlen=lines))

    # -- internals --------------------------------------------------------------------------
    def _job(self, job_id: str) -> JobRecord:
        job = self.store.get_job(job_id)
        if job is None:
            raise JobError(f"No job with id '{job_id}'.")
        return job

    def _check_secrets(self, kind: str, secrets: Mapping[str, Secret] | None) -> None:
        if secrets and kind in self.kinds and not self.kinds[kind].thread:
            raise JobError(f"Jobs of kind '{kind}' run in a subprocess and take no keys.")

    def _launch(self, job_id: str, kind: str, spec: dict[str, Any], resume: bool,
                secrets: Mapping[str, Secret] | None = None) -> None:
        job_dir(job_id).mkdir(parents=True, exist_ok=True)
        self._cancel[job_id] = threading.Event()
        thread = threading.Thread(
            target=self._run, args=(job_id, self.kinds[kind], spec, resume, dict(secrets or {})),
            name=f"job-{job_id}", daemon=True,
        )
        self._threads[job_id] = thread
        thread.start()

    def _run(self, job_id: str, kind: JobKind, spec: dict[str, Any], resume: bool,
             secrets: dict[str, Secret]) -> None:
        try:
            self._run_once(job_id, kind, spec, resume, secrets)
        finally:
            secrets.clear()  # the context's mapping too: nothing outlives the run

    def _run_once(self, job_id: str, kind: JobKind, spec: dict[str, Any], resume: bool,
                  secrets: dict[str, Secret]) -> None:
        cancel = self._cancel[job_id]
        with self._slots if kind.slot else contextlib.nullcontext():
            if cancel.is_set():
                self._finish(job_id, "cancelled", message="cancelled before it started")
                logger.info("job %s cancelled before it started", job_id)
                return
            job = self._job(job_id)
            start_fraction = job.progress if resume else 0.0
            attempts = job.attempts + 1
            self.store.update_job(job_id, status="running", started_at=now(), attempts=attempts,
                                  message="started")
            progress = _Progress(self.store, job_id, start_fraction)
            log_path = job_dir(job_id) / "log.txt"
            logger.info("job %s (%s) %s, attempt %d", job_id, job.kind,
                        "resumed" if resume else "started", attempts)
            t0 = time.monotonic()
            try:
                if kind.thread:
                    ctx = JobContext(job_id, spec, resume, progress, cancel, log_path, secrets)
                    result = kind.thread(ctx)
                else:
                    result = self._run_subprocess(job_id, kind.argv(spec, resume), progress,
                                                  log_path)
                if kind.on_done:
                    kind.on_done(job_id, result or {})
            except JobCancelled:
                status = "cancelled"
                self._finish(job_id, status, message="cancelled by the user")
            except Exception as exc:  # a job's failure is recorded, never lost in a thread
                # The traceback goes to the job's log and the server log; the row (what users
                # see) keeps the one-line error.
                with log_path.open("a", encoding="utf-8") as fh:
                    fh.write(traceback.format_exc())
                status = "cancelled" if cancel.is_set() else "failed"
                if status == "failed":
                    logger.exception("job %s (%s) failed", job_id, job.kind)
                    self._finish(job_id, status, message="failed", error=one_line(exc))
                else:
                    self._finish(job_id, status, message="cancelled by the user")
            else:
                status = "done"
                self._finish(job_id, status, result=result or {}, progress=1.0, message="done")
            logger.info("job %s (%s) ended %s after %.1f s", job_id, job.kind, status,
                        time.monotonic() - t0)

    def _run_subprocess(self, job_id: str, argv: list[str], progress: _Progress,
                        log_path: Path) -> dict[str, Any]:
        events_path = job_dir(job_id) / EVENTS_FILE
        saved_result = result_path(events_path)
        saved_result.unlink(missing_ok=True)  # only this attempt's result counts
        reader = EventReader(events_path)
        env = {**os.environ, JOB_ENV: job_id, EVENTS_ENV: str(events_path), "PYTHONUNBUFFERED": "1"}
        with log_path.open("a", encoding="utf-8") as log:
            log.write(f"$ {' '.join(argv)}\n")
            log.flush()
            proc = procs.spawn(argv, env, config.REPO_DIR, log)
        self._procs[job_id] = proc
        if self._cancel[job_id].is_set():  # cancelled while it was being started
            procs.signal_group(proc.pid, signal.SIGTERM)
        self.store.update_job(job_id, pid=proc.pid, pgid=proc.pid)
        result = None
        try:
            finished = False
            while not finished:
                try:
                    proc.wait(EVENT_POLL_SECONDS)
                    finished = True
                except subprocess.TimeoutExpired:
                    pass
                result = self._apply_events(job_id, reader.read(final=finished), progress) or result
        finally:
            if proc.poll() is None:  # this thread failed: the child must not run on unwatched
                procs.signal_group(proc.pid, signal.SIGTERM)
            self._procs.pop(job_id, None)
            self.store.update_job(job_id, pid=None, pgid=None)
        if self._cancel[job_id].is_set():
            raise JobCancelled()
        if proc.returncode != 0:
            raise RuntimeError(self._child_error(job_id, proc.returncode))
        if result is None:
            result = read_result(saved_result)
            if result is not None:
                logger.warning("job %s: no result event; took the result from %s", job_id,
                               saved_result)
        return result or {}

    @staticmethod
    def _apply_events(job_id: str, events: list[dict[str, Any]],
                      progress: _Progress) -> dict[str, Any] | None:
        """Record a batch of a child's events; returns the result if the batch holds one."""
        result, latest = None, None
        for event in events:
            if "result" in event:
                result = event["result"]
            elif "metric" in event:
                _append_metric(job_id, event["metric"])
            else:
                latest = event
        if latest is not None:  # only the newest fraction of a batch matters
            progress.update(latest["progress"], latest.get("message", ""))
        return result

    def _child_error(self, job_id: str, returncode: int) -> str:
        """One sentence for a child that failed: its last own line (its `error: ...` message, or
        a traceback's last line), never the command line or the traceback's frames."""
        lines = [line.strip() for line in self.log_tail(job_id, 40).splitlines()
                 if line.strip() and not line.startswith(("$ ", " ", "\t", "Traceback "))]
        reason = lines[-1].removeprefix("error: ")[:MAX_ERROR_CHARS] if lines else ""
        if not reason:
            return f"The process exited with code {returncode}; its log has the details."
        return f"{reason} (exit code {returncode})"

    def _stop_orphan(self, job: JobRecord) -> bool:
        """Stop the process group a previous app recorded for `job` if it still runs the job,
        and forget it; returns whether something was stopped."""
        stopped = procs.kill_orphan(job.pgid, job.id)
        self.store.update_job(job.id, pid=None, pgid=None)
        return stopped

    def _finish(self, job_id: str, status: str, **fields: Any) -> None:
        if self._job(job_id).status == "interrupted":
            return  # another runner (a restarted app) declared this attempt dead and owns the record
        self.store.update_job(job_id, status=status, finished_at=now(), eta_seconds=None, **fields)


def one_line(exc: BaseException) -> str:
    """What a job's row says about its failure: the first line of the message (the traceback is
    in the job's log and the server log)."""
    lines = str(exc).strip().splitlines()
    return lines[0][:MAX_ERROR_CHARS] if lines else type(exc).__name__


def _append_metric(job_id: str, values: dict[str, Any]) -> None:
    with (job_dir(job_id) / "metrics.jsonl").open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(values) + "\n")

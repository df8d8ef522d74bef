"""What visitors may do with background jobs: start one within the caps, and look at, cancel or
resume one by its id. The UI and the catalogs go through here, never to the runner directly.

Every job id from a request is checked before the runner or a folder is touched: its shape first
(core.names.check_id: "../x" never reaches a path), then that the job exists (the runner's job
folder is only ever opened for a real job). In public mode the desk caps the jobs visitors have
queued or running (MAX_RUNNING_JOBS), lets each visitor session run one fine-tune at a time, and
lets a visitor cancel or resume only the jobs their own session started here; locally it is as
permissive as the runner itself.

Who started which job is kept in memory only: after a restart every visitor's job is interrupted
anyway, and in public mode nobody can resume it from the UI (a new session is a new visitor).
"""
from __future__ import annotations

import logging
import threading
from typing import Any, Callable, Mapping

from core.names import check_id
from core.records import JobRecord
from core.schema import InputError
from core.secrets import Secret
from jobs.runner import TERMINAL, JobRunner

logger = logging.getLogger(__name__)


class JobLimitError(InputError):
    """A start refused because the server, or this visitor, already runs as much as allowed."""


class JobOwnerError(InputError):
    """In public mode: a cancel or resume of a job that another session (or the operator) started."""


class JobDesk:
    def __init__(self, runner: JobRunner, max_running: int | None = None,
                 one_per_visitor: frozenset[str] = frozenset(), owners_only: bool = False) -> None:
        """`max_running`: jobs started here that may be queued or running at once (None: no cap);
        `one_per_visitor`: the kinds a visitor session may have only one of at a time;
        `owners_only`: cancel and resume only the caller's own jobs (public mode)."""
        self.runner, self.max_running, self.one_per_visitor = runner, max_running, one_per_visitor
        self.owners_only = owners_only
        self._lock = threading.Lock()
        self._active: dict[str, tuple[str, str | None]] = {}  # job id -> (kind, visitor)
        self._started_by: dict[str, str | None] = {}  # every job admitted here -> its visitor

    def admit(self, kind: str, visitor: str | None, start: Callable[[], str]) -> str:
        """Call `start` (it starts or resumes one job of `kind`, returning its id) if the caps
        allow; JobLimitError, with what to do, when they do not. `visitor` is the Gradio
        session hash (None for the CLI and the operator's own jobs)."""
        with self._lock:
            self._forget_ended()
            if self.max_running is not None and len(self._active) >= self.max_running:
                logger.info("refused a %s job: %d jobs running (MAX_RUNNING_JOBS)", kind,
                            len(self._active))
                raise JobLimitError(
                    f"The server is busy: {len(self._active)} jobs are queued or running, the most "
                    "it runs at once. Try again when one of them has finished.")
            mine = [job_id for job_id, (k, v) in self._active.items()
                    if visitor and k == kind and v == visitor and kind in self.one_per_visitor]
            if mine:
                logger.info("refused a second %s job for visitor %s", kind, visitor)
                raise JobLimitError(f"You already have a {kind} job running ({mine[0]}): wait for "
                                    "it to finish or cancel it before starting another.")
            job_id = start()
            self._active[job_id] = (kind, visitor)
            self._started_by[job_id] = visitor
        logger.info("admitted %s job %s (visitor %s)", kind, job_id, visitor or "-")
        return job_id

    def jobs(self, limit: int = 100) -> list[JobRecord]:
        """The newest jobs first."""
        return self.runner.jobs(limit=limit)

    def active(self, kind: str) -> JobRecord | None:
        """The newest queued or running job of `kind` (what a reloaded page shows), or None."""
        return next((job for job in self.runner.jobs(kind, limit=20)
                     if job.status not in TERMINAL), None)

    def get(self, job_id: str) -> JobRecord:
        """The job's record; InvalidNameError for a malformed id, JobError for an unknown one."""
        return self.runner.get(self._checked(job_id))

    def log_tail(self, job_id: str, lines: int = 40) -> str:
        return self.runner.log_tail(self.get(job_id).id, lines)

    def metrics(self, job_id: str) -> list[dict[str, Any]]:
        return self.runner.metrics(self.get(job_id).id)

    def cancel(self, job_id: str, visitor: str | None = None) -> None:
        """Ask a job to stop (`visitor`: the Gradio session asking; see `owners_only`)."""
        self.runner.cancel(self._owned(job_id, visitor, "cancel").id)

    def resume(self, job_id: str, visitor: str | None = None,
               secrets: Mapping[str, Secret] | None = None) -> str:
        """Run a stopped job again; it counts against the caps like a new start. `secrets`: the
        visitor's keys, for this run only (JobRunner.start)."""
        job = self._owned(job_id, visitor, "resume")
        return self.admit(job.kind, visitor, lambda: self.runner.resume(job.id, secrets))

    def _owned(self, job_id: str, visitor: str | None, action: str) -> JobRecord:
        """The job, if `visitor` may act on it: anyone locally; in public mode only the session
        that started it here (the operator's and the CLI's jobs belong to no visitor)."""
        job = self.get(job_id)
        with self._lock:
            owner = self._started_by.get(job.id)
        if self.owners_only and (visitor is None or owner != visitor):
            logger.info("refused to %s job %s for visitor %s (started by %s)", action, job.id,
                        visitor or "-", owner or "-")
            raise JobOwnerError(f"You can {action} only the jobs you started in this browser "
                                f"session; {job.id} is not one of them.")
        return job

    def _forget_ended(self) -> None:
        for job_id in list(self._active):
            if self.runner.get(job_id).status in TERMINAL:
                del self._active[job_id]

    @staticmethod
    def _checked(job_id: Any) -> str:
        return check_id(job_id.strip() if isinstance(job_id, str) else job_id, "Job id")

"""What visitors may do with background jobs: start one within the caps, and look at, cancel or
resume one by its id. The UI and the catalogs go through here, never to the runner directly.

Every job id from a request is checked before the runner or a folder is touched: its shape first
(core.names.check_id: "../x" never reaches a path), then that the job exists (the runner's job
folder is only ever opened for a real job). In public mode the desk caps the jobs visitors have
queued or running (MAX_RUNNING_JOBS) and lets each visitor session run one fine-tune at a time;
locally it is as permissive as the runner itself.
"""
from __future__ import annotations

import logging
import threading
from typing import Any, Callable, Mapping

from core.names import check_id
from core.secrets import Secret
from core.schema import InputError
from jobs.runner import TERMINAL, JobRunner

logger = logging.getLogger(__name__)


class JobLimitError(InputError):
    """A start refused because the server, or this visitor, already runs as much as allowed."""


class JobDesk:
    def __init__(self, runner: JobRunner, max_running: int | None = None,
                 one_per_visitor: frozenset[str] = frozenset()) -> None:
        """`max_running`: jobs started here that may be queued or running at once (None: no cap);
        `one_per_visitor`: the kinds a visitor session may have only one of at a time."""
        self.runner, self.max_running, self.one_per_visitor = runner, max_running, one_per_visitor
        self._lock = threading.Lock()
        self._active: dict[str, tuple[str, str | None]] = {}  # job id -> (kind, visitor)

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
        logger.info("admitted %s job %s (visitor %s)", kind, job_id, visitor or "-")
        return job_id

    def jobs(self, limit: int = 100) -> list[dict[str, Any]]:
        """The newest jobs first."""
        return self.runner.jobs(limit=limit)

    def get(self, job_id: str) -> dict[str, Any]:
        """The job's record; InvalidNameError for a malformed id, JobError for an unknown one."""
        return self.runner.get(self._checked(job_id))

    def log_tail(self, job_id: str, lines: int = 40) -> str:
        return self.runner.log_tail(self.get(job_id)["id"], lines)

    def metrics(self, job_id: str) -> list[dict[str, Any]]:
        return self.runner.metrics(self.get(job_id)["id"])

    def cancel(self, job_id: str) -> None:
        self.runner.cancel(self.get(job_id)["id"])

    def resume(self, job_id: str, visitor: str | None = None,
               secrets: Mapping[str, Secret] | None = None) -> str:
        """Run a stopped job again; it counts against the caps like a new start. `secrets`: the
        visitor's keys, for this run only (JobRunner.start)."""
        job = self.get(job_id)
        return self.admit(job["kind"], visitor, lambda: self.runner.resume(job["id"], secrets))

    def _forget_ended(self) -> None:
        for job_id in list(self._active):
            if self.runner.get(job_id)["status"] in TERMINAL:
                del self._active[job_id]

    @staticmethod
    def _checked(job_id: Any) -> str:
        return check_id(job_id.strip() if isinstance(job_id, str) else job_id, "Job id")

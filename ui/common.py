"""Helpers shared by the tabs: turning user-caused errors into Gradio messages, and showing a
background job's state."""
from __future__ import annotations

import functools
import inspect
from typing import Any, Callable

import gradio as gr

from jobs.runner import JobError, JobRunner


def user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Show ValueError subclasses (our user-facing errors) as a Gradio error message.

    Anything else is a bug and keeps its traceback in the server log."""
    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def gen_wrapper(*args: Any, **kwargs: Any):
            try:
                yield from fn(*args, **kwargs)
            except ValueError as exc:
                raise gr.Error(str(exc)) from exc
        return gen_wrapper

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any):
        try:
            return fn(*args, **kwargs)
        except ValueError as exc:
            raise gr.Error(str(exc)) from exc
    return wrapper


def fmt_seconds(seconds: float | None) -> str:
    if seconds is None:
        return ""
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def job_status(runner: JobRunner, job_id: str) -> tuple[dict[str, Any] | None, str]:
    """A job's record and the line a tab's poll shows (status, progress, message, ETA, then the
    error); (None, a message) for an unknown id."""
    try:
        job = runner.get(job_id)
    except JobError:
        return None, f"No job `{job_id}`."
    eta = f" · ETA {fmt_seconds(job['eta_seconds'])}" if job["eta_seconds"] else ""
    text = f"**{job['status']}** · {job['progress']:.0%} · {job['message'] or ''}{eta}"
    if job["error"]:
        text += f"\n\n{job['error']}"
    return job, text

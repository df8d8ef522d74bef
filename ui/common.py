"""Helpers shared by the tabs: turning user-caused errors into Gradio messages, and showing a
background job's state."""
from __future__ import annotations

import functools
import inspect
import logging
from typing import Any, Callable

import gradio as gr

from core.names import InvalidNameError
from core.records import JobRecord
from jobs.desk import JobDesk
from jobs.runner import JobError

logger = logging.getLogger(__name__)

BUG_MESSAGE = "Something went wrong on the server ({}); the details are in its log."

# Gradio queue limits for the heavy events, each group sharing one limit (concurrency_id): model
# generation, index builds, statistics and job starts. Every other event gets the app's default.
# Generation admits 8 at once: the hub merges their requests into shared batches (core/batcher.py,
# at most BATCH_MAX_ROWS rows each), so more visitors in flight means fuller batches.
GENERATE = {"concurrency_id": "generate", "concurrency_limit": 8}
INDEX = {"concurrency_id": "index", "concurrency_limit": 1}
STATS = {"concurrency_id": "stats", "concurrency_limit": 2}
START_JOB = {"concurrency_id": "start_job", "concurrency_limit": 1}


def user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Show errors as one-line Gradio messages. ValueError subclasses are our user-facing errors:
    their sentence is shown and the refusal logged at INFO. Anything else is a bug: the visitor
    sees its type only (no paths, no traceback) and the traceback goes to the server log."""
    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def gen_wrapper(*args: Any, **kwargs: Any):
            try:
                yield from fn(*args, **kwargs)
            except gr.Error:
                raise
            except Exception as exc:
                raise _shown(fn, exc) from exc
        return gen_wrapper

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any):
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except Exception as exc:
            raise _shown(fn, exc) from exc
    return wrapper


def _shown(fn: Callable[..., Any], exc: Exception) -> gr.Error:
    if isinstance(exc, ValueError):
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        logger.info("refused %s: %s", fn.__name__, message)
        return gr.Error(message)
    logger.exception("%s failed", fn.__name__)
    return gr.Error(BUG_MESSAGE.format(type(exc).__name__))


def on_show(page: gr.Blocks, tab: gr.Tab, fn: Callable[..., Any], inputs: list,
            outputs: list) -> None:
    """Run `fn` when the page loads (a reload re-reads the server's state: lists, the running
    job) and whenever `tab` is selected (what other tabs or visitors changed since)."""
    page.load(fn, inputs=inputs, outputs=outputs, api_name=False, show_progress="hidden")
    tab.select(fn, inputs=inputs, outputs=outputs, api_name=False, show_progress="hidden")


def empty_note(table: gr.Dataframe, message: str) -> gr.Markdown:
    """A line in place of `table` while it has no rows, saying what fills it (instead of a
    header-only table). Call it right after creating the table, inside the same layout block;
    the table is hidden until a value with rows arrives (a load, a timer or an event)."""
    table.visible = False
    note = gr.Markdown(f"_{message}_")

    def toggle(df: Any) -> tuple[dict, dict]:
        filled = has_rows(df)
        return gr.update(visible=filled), gr.update(visible=not filled)

    table.change(toggle, inputs=table, outputs=[table, note], api_name=False, queue=False,
                 show_progress="hidden")
    return note


def restyle(event: Any, component: Any, fn: Callable[..., dict] | None = None) -> None:
    """After a successful public endpoint, change how `component` looks (visible, widths,
    label) in a separate step, so the endpoint itself returns a plain value to API callers
    (a gr.update would reach gradio_client as a raw dict). `fn(value)` gives the changes; by
    default the component is shown."""
    event.success(fn or (lambda _value: gr.update(visible=True)), inputs=component,
                  outputs=component, api_name=False, queue=False, show_progress="hidden")


def has_rows(df: Any) -> bool:
    """Whether a table's value holds a non-blank cell (Gradio sends an empty table as one blank
    row)."""
    if df is None or len(df) == 0:
        return False
    return bool(df.map(lambda v: v is not None and str(v).strip() != "").to_numpy().any())


def follow_job(jobs: JobDesk, kind: str, current: str | None, **changes: Any) -> dict:
    """The update of a tab's job box on show (`changes`: more, e.g. choices): it keeps the id
    already there, else takes the newest running job of `kind`, so after a reload the tab
    follows that job again (its change event shows the progress)."""
    job = None if (current or "").strip() else jobs.active(kind)
    return gr.update(value=job.id, **changes) if job else gr.update(**changes)


def visitor(request: gr.Request | None) -> str | None:
    """The visitor's Gradio session (the key of the per-visitor job cap); None outside a request."""
    return getattr(request, "session_hash", None) if request is not None else None


def fmt_seconds(seconds: float | None) -> str:
    if seconds is None:
        return ""
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def eta_of(job: JobRecord) -> float | None:
    """The ETA worth showing: only while the job runs and once its rate is known."""
    return job.eta_seconds if job.status == "running" else None


def job_status(jobs: JobDesk, job_id: str) -> tuple[JobRecord | None, str]:
    """A job's record and the line a tab's poll shows (status, progress, message, ETA, then the
    error); (None, why) for an unknown or malformed id."""
    try:
        job = jobs.get(job_id)
    except (JobError, InvalidNameError) as exc:  # said in the status line, not a popup
        return None, str(exc)
    eta = f" · ETA {fmt_seconds(eta_of(job))}" if eta_of(job) else ""
    text = f"**{job.status}** · {job.progress:.0%} · {job.message or ''}{eta}"
    if job.error:
        text += f"\n\n{job.error}"
    return job, text

"""Helpers shared by the tabs: turning user-caused errors into Gradio messages."""
from __future__ import annotations

import functools
import inspect
from typing import Any, Callable

import gradio as gr


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

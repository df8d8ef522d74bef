"""A study's report as a file to attach to a pull request or a paper: Markdown, or one
self-contained HTML page. The figure (core.charts.study, as the Study tab draws it) is embedded as a PNG
data URL that vl-convert renders from the Vega-Lite spec on this machine: opening the file fetches
no script, font or stylesheet. The HTML is the Markdown rendered by markdown-it with raw HTML off,
so a model name or metric typed into a spec is shown as text, never run."""
from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any

import vl_convert
from markdown_it import MarkdownIt

from core import charts
from jobs.study.plan import StudyPlan
from jobs.study.report import figure_rows, markdown
from jobs.study.spec import StudySpecError

FORMATS = {"md": "Markdown", "html": "HTML"}
PNG_SCALE = 2  # sharp on high-density screens and in print
STYLE = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;
color:#1f2937;line-height:1.45}table{border-collapse:collapse;margin:.5em 0;font-size:.9em}
th,td{border:1px solid #d1d5db;padding:.25em .6em;text-align:left}th{background:#f3f4f6}
img{max-width:100%}code{background:#f3f4f6;padding:0 .2em}"""


def check_format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise StudySpecError(f"Unknown report format '{fmt}': choose one of {', '.join(FORMATS)}.")
    return fmt


def figure_png(plan: StudyPlan, rows: list[dict[str, Any]]) -> bytes | None:
    """The study's figure (core.charts.study of report.figure_rows, as the Study tab draws it) as
    PNG bytes; None before any score exists."""
    points = [r for r in rows if r["mean"] is not None]
    if not points:
        return None
    chart = charts.study(figure_rows(plan.spec, points))
    return vl_convert.vegalite_to_png(chart.to_dict(), scale=PNG_SCALE)


def render(plan: StudyPlan, rows: list[dict[str, Any]], fmt: str) -> str:
    """The report with its figures, as Markdown or as a whole HTML page."""
    png = figure_png(plan, rows)
    text = markdown(plan, rows, png and "data:image/png;base64," + base64.b64encode(png).decode("ascii"))
    if check_format(fmt) == "md":
        return text
    body = MarkdownIt("commonmark", {"html": False}).enable("table").render(text)
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>Study: {html.escape(plan.spec.name)}</title><style>{STYLE}</style></head>\n"
            f"<body>\n{body}</body></html>\n")


def write_report(plan: StudyPlan, rows: list[dict[str, Any]], fmt: str, path: Path) -> Path:
    """`render`'s text written to `path` (its folder made); the path."""
    text = render(plan, rows, fmt)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path

"""`python -m jobs.study plan|run|resume|report SPEC`: the same study job and rows as the app.

SPEC is a JSON or YAML file (studies/cpu-mini.json is shipped); the flags after it override its
fields (one flag per field, generated from the spec: --sizes 4,8, --evaluation-n-items 2). `run`
and `resume` need the database to themselves: stop the app first.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from core.schema import InputError
from core.spec_cli import add_spec_arguments, spec_overrides
from core.store import StoreLockedError
from jobs.study.export import FORMATS, write_report
from jobs.study.report import report_rows
from jobs.study.run import Studies
from jobs.study.spec import StudySpec, StudySpecError, parse_spec

ACTIONS = {"plan": "show the steps, what is already done, counts and a time estimate",
           "run": "start the study (steps already done are skipped) and print its report",
           "resume": "resume the stopped study job of this spec (or start one) and print its report",
           "report": "print the results and verdicts as Markdown; --out FILE or --format writes "
                     "the report with its figure (HTML: one self-contained page)"}
NOT_FLAGS = ("pipelines", "evaluation.decoding")  # objects: set them in the SPEC file


def read_spec_file(path: str) -> dict[str, Any]:
    """The object in a .json, .yaml or .yml file."""
    file = Path(path)
    if not file.is_file():
        raise StudySpecError(f"No study spec file at {path}.")
    return parse_spec(file.read_text(encoding="utf-8"), path, file.suffix in (".yaml", ".yml"))


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(
        prog="python -m jobs.study", description="The study as one resumable job: fine-tunes and "
        "evaluations over datasets x sizes x models, ending in paired differences and a verdict.")
    actions = root.add_subparsers(dest="action", required=True)
    for action, help_text in ACTIONS.items():
        sub = actions.add_parser(action, help=help_text, description=help_text)
        sub.add_argument("spec_file", metavar="SPEC", help="study spec: a .json or .yaml file")
        if action == "report":
            sub.add_argument("--out", help="write the report with its figure to this file (its "
                             "format from --format, else from the suffix: .html or .md)")
            sub.add_argument("--format", choices=list(FORMATS), help="html or md; without --out, "
                             "written to the data dir's exports folder")
        add_spec_arguments(sub, StudySpec, exclude=NOT_FLAGS)
    return root


def spec_from_args(args: argparse.Namespace) -> StudySpec:
    data = read_spec_file(args.spec_file)
    return StudySpec.from_dict(spec_overrides(args, StudySpec, data))


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from jobs.evaluate.cli import follow
    from jobs.runner import JobError
    from jobs.services import build_services

    try:
        spec = spec_from_args(args)
        services = build_services(warm_up=False)
        studies = services.studies
        if args.action == "plan":
            print(studies.plan(spec).describe())
            return 0
        if args.action == "report":
            return _report(studies, spec, args.out, args.format)
        job_id = studies.start(spec) if args.action == "run" else studies.resume(spec)
    except (StoreLockedError, InputError, JobError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"study job {job_id}", flush=True)
    job = follow(services, job_id)
    if job.status != "done":
        print(f"{job.status}: {job.error or job.message} — continue with "
              f"`python -m jobs.study resume {args.spec_file}`", file=sys.stderr)
        return 1
    print(studies.report(spec), end="")
    return 0


def _report(studies: Studies, spec: StudySpec, out: str | None, fmt: str | None) -> int:
    """Markdown on stdout, or the report with its figure in a file (the path printed)."""
    if out is None and fmt is None:
        print(studies.report(spec), end="")
        return 0
    if out is None:
        path = studies.export(spec, fmt)
    else:
        path = Path(out)
        fmt = fmt or ("html" if path.suffix in (".html", ".htm") else "md")
        plan = studies.plan(spec)
        write_report(plan, report_rows(studies.res, plan), fmt, path)
    print(f"report written to {path}")
    return 0

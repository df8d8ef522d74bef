"""`python -m jobs.evaluate`: the same evaluation job and rows as the app's Evaluate tab."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core.records import JobRecord
from core.spec_cli import add_spec_arguments, spec_overrides
from core.store import StoreLockedError
from core.systems import BASE
from jobs.evaluate.spec import EvalSpec, EvalSpecError
from jobs.runner import TERMINAL

if TYPE_CHECKING:
    from jobs.services import Services


def _cli_system(value: str) -> dict[str, Any]:
    """JSON ({"kind": "openai", "model": ..., "base_url": ..., "rag": true}) or MODEL[:ADAPTER][:rag]."""
    if value.strip().startswith("{"):
        return json.loads(value)
    parts = value.split(":")
    rag = parts[-1].lower() == "rag"
    parts = parts[:-1] if rag else parts
    if not 1 <= len(parts) <= 2 or not parts[0]:
        raise argparse.ArgumentTypeError(f"--system '{value}': use MODEL[:ADAPTER][:rag] or JSON.")
    return {"kind": "local", "model": parts[0], "adapter": parts[1] if len(parts) == 2 else BASE,
            "rag": rag}


def _cli_metric(value: str) -> str | dict[str, Any]:
    return json.loads(value) if value.strip().startswith("{") else value


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m jobs.evaluate",
        description="Batch G-Eval: answer the eval items with each system, judge every answer per "
                    "metric, store everything in DuckDB (the same job and rows as the app's "
                    "Evaluate tab). Needs the database to itself: stop the app first.")
    p.add_argument("--spec-json", help="the whole spec as JSON, or @FILE; other options override it")
    p.add_argument("--resume", metavar="RUN_ID", help="continue a stopped run (its job id)")
    # Parsed here (the spec cannot be a flag per field), but like the generated flags: given or absent.
    p.add_argument("--system", dest="systems", action="append", type=_cli_system,
                   default=argparse.SUPPRESS,
                   help="MODEL[:ADAPTER][:rag] or a JSON system; repeat for each system")
    p.add_argument("--metric", dest="metrics", action="append", type=_cli_metric,
                   default=argparse.SUPPRESS,
                   help="accuracy | completeness | JSON {name, criteria, steps?, score_min?, "
                        "score_max?, uses_context?}; repeat for each")
    add_spec_arguments(p, EvalSpec, exclude=("systems", "metrics", "decoding"),
                       aliases={"dataset_id": "--dataset"})
    decoding = p.add_argument_group("answer decoding (the spec's decoding)")
    decoding.add_argument("--max-new-tokens", type=int, help="answer length limit")
    decoding.add_argument("--temperature", type=float, help="answer temperature (0 = greedy)")
    decoding.add_argument("--top-p", type=float)
    return p


def spec_from_args(args: argparse.Namespace) -> EvalSpec:
    data: dict[str, Any] = {}
    if args.spec_json:
        text = args.spec_json
        if text.startswith("@"):
            text = Path(text[1:]).read_text(encoding="utf-8")
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise EvalSpecError(f"--spec-json is not valid JSON ({exc.msg}).") from exc
        if not isinstance(data, dict):
            raise EvalSpecError("--spec-json must hold a JSON object.")
    data = spec_overrides(args, EvalSpec, data)
    decoding = dict(data.get("decoding") or {})
    for key in ("max_new_tokens", "temperature", "top_p"):
        if getattr(args, key) is not None:
            decoding[key] = getattr(args, key)
    data["decoding"] = decoding
    return EvalSpec.from_dict(data)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from jobs.runner import JobError
    from jobs.services import build_services

    try:
        spec = None if args.resume else spec_from_args(args)
        services = build_services(warm_up=False)
        job_id = (services.runner.resume(args.resume) if args.resume
                  else services.evaluations.start(spec))
    except (StoreLockedError, ValueError, JobError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"run {job_id}", flush=True)
    job = follow(services, job_id)
    if job.status != "done":
        print(f"{job.status}: {job.error or job.message} — resume with "
              f"`python -m jobs.evaluate --resume {job_id}`", file=sys.stderr)
        return 1
    for row in services.evaluations.summary(job_id):
        diff = "" if row["diff"] is None else f"  diff vs base {row['diff']:+.2f}"
        mean = "n/a" if row["mean"] is None else f"{row['mean']:.2f}"
        print(f"{row['system']:<48} {row['metric']:<14} mean {mean} (n={row['n']}, "
              f"parse failures {row['parse_failures']}){diff}")
    return 0


def follow(services: "Services", job_id: str) -> JobRecord:
    """Print the job's progress lines until it ends; Ctrl-C cancels it and waits for the end."""
    last = None
    try:
        while True:
            job = services.runner.wait(job_id, timeout=1.0)
            line = f"[{job.progress:6.1%}] {job.message or ''}"
            if line != last:
                print(line, flush=True)
                last = line
            if job.status in TERMINAL:
                return job
    except KeyboardInterrupt:
        services.runner.cancel(job_id)
        return services.runner.wait(job_id)

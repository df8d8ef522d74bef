"""A whole study (default: the shipped cpu-mini spec) run as the app runs it, timed per step kind:

    .venv/bin/python -m bench.study [SPEC] [--sizes 4,8 ...any `python -m jobs.study` flag]
                                    [--data-dir DIR]

The study job (jobs.study) runs in a fresh data dir (a temporary one unless --data-dir names one:
there, what exists is reused and only the rest is timed). It records each step's wall seconds and
CPU seconds (this process and its fine-tune children; see jobs.study.run._cpu_seconds); this
prints them summed per step kind (index, finetune, evaluate), the whole job's wall time, and the
planner's estimate beside it (the baseline of this bench: estimated / measured; the estimate uses
DEFAULT_SECONDS until the data dir holds finished jobs of each kind). On 2 shared cores wall time
moves with the load: the CPU seconds and the load average are printed beside it.
"""
from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_SPEC = REPO / "studies" / "cpu-mini.json"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    data_dir = None
    if "--data-dir" in argv:
        at = argv.index("--data-dir")
        data_dir = argv[at + 1]
        del argv[at:at + 2]
    if not argv or argv[0].startswith("-"):
        argv.insert(0, str(DEFAULT_SPEC))
    # The data dir is read when the services are built: set it before importing them.
    os.environ["DATA_DIR"] = data_dir or tempfile.mkdtemp(prefix="bench-study-")
    from jobs.services import build_services
    from jobs.study.cli import parser, spec_from_args

    spec = spec_from_args(parser().parse_args(["run", *argv]))
    services = build_services(warm_up=False)
    plan = services.studies.plan(spec)
    print(f"data dir {os.environ['DATA_DIR']}\n{plan.describe()}", flush=True)
    load0, wall = os.getloadavg()[0], time.perf_counter()
    job_id = services.studies.start(spec)
    job = services.runner.wait(job_id)
    wall = time.perf_counter() - wall
    if job.status != "done":
        print(f"study {job.status}: {job.error or job.message}", file=sys.stderr)
        return 1
    result = job.result or {}
    print(f"\nstudy '{spec.name}': {wall:.1f} s wall for the job, load average "
          f"{load0:.1f} -> {os.getloadavg()[0]:.1f}, {os.cpu_count()} cores")
    print(f"{'step kind':<10} {'steps':>5} {'wall s':>9} {'CPU s':>9} {'CPU/wall':>8}")
    for kind, t in result.get("seconds_by_kind", {}).items():
        print(f"{kind:<10} {t['steps']:>5} {t['wall_s']:>9.1f} {t['cpu_s']:>9.1f} "
              f"{t['cpu_s'] / t['wall_s'] if t['wall_s'] else 0:>8.2f}")
    steps = sum(t["wall_s"] for t in result.get("step_times", []))
    print(f"{'all steps':<10} {len(result.get('step_times', [])):>5} {steps:>9.1f}")
    if plan.seconds:
        default = f" (default rates for {', '.join(plan.unmeasured)})" if plan.unmeasured else ""
        print(f"planner's estimate{default} {plan.seconds:.0f} s: estimated / measured = "
              f"{plan.seconds / wall:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

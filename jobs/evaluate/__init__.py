"""Batch G-Eval: spec (what to run), run (the job), cli (`python -m jobs.evaluate`)."""
from jobs.evaluate.run import (EvalResources, Plan, RetriesExhaustedError, check_no_leakage,
                               evaluation_job, keys_for, preflight, run_evaluation,
                               select_examples, start_evaluation)
from jobs.evaluate.spec import KIND, EvalSpec, EvalSpecError, JudgeSpec

__all__ = ["KIND", "EvalResources", "EvalSpec", "EvalSpecError", "JudgeSpec", "Plan",
           "RetriesExhaustedError", "check_no_leakage", "evaluation_job", "keys_for", "preflight",
           "run_evaluation", "select_examples", "start_evaluation"]

"""Batch G-Eval: spec (what to run), run (the job), cli (`python -m jobs.evaluate`)."""
from jobs.evaluate.run import (EvalResources, RetriesExhaustedError, evaluation_job, preflight,
                               run_evaluation, select_examples, set_session_api_key,
                               start_evaluation)
from jobs.evaluate.spec import KIND, EvalSpec, EvalSpecError, JudgeSpec

__all__ = ["KIND", "EvalResources", "EvalSpec", "EvalSpecError", "JudgeSpec",
           "RetriesExhaustedError", "evaluation_job", "preflight", "run_evaluation",
           "select_examples", "set_session_api_key", "start_evaluation"]

"""What the Evaluate and Compare tabs read and write about evaluations: starting runs, their
summaries and items, exports, run comparison, the study view, the read-only SQL box, and votes.
The UI calls this; the SQL lives in core/store/, the SQL box's sandbox in core/sqlbox.py and the
statistics in core/evalstats.py. Run ids from a request are checked (core.names.check_id) before any
query or export file uses them."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping

from core import config, evalstats
from core.geval import metric_from
from core.names import check_id
from core.records import AdapterRecord, EvalRunRecord
from core.secrets import Secret
from core.sqlbox import EXAMPLE_QUERIES, SqlBox, SqlResult
from core.store import Store
from core.systems import System
from jobs.desk import JobDesk
from jobs.evaluate import KIND, EvalResources, EvalSpec, keys_for, start_evaluation
from jobs.runner import JobError


class Evaluations:
    def __init__(self, store: Store, jobs: JobDesk, resources: EvalResources,
                 adapter_rows: Callable[[], list[AdapterRecord]]) -> None:
        self.store, self.jobs, self.resources = store, jobs, resources
        self._adapter_rows = adapter_rows
        self.sql_box = SqlBox(store)

    def start(self, spec: EvalSpec, visitor: str | None = None,
              keys: Mapping[str, Secret] | None = None) -> str:
        """Check the request, then start it as a background job within the job caps (`visitor`:
        the Gradio session asking; `keys`: its keys by endpoint, in memory for this run only);
        returns the run id."""
        return self.jobs.admit(KIND, visitor,
                               lambda: start_evaluation(self.resources, self.jobs.runner, spec, keys))

    def resume(self, run_id: str, visitor: str | None = None,
               keys: Mapping[str, Secret] | None = None) -> str:
        """Run a stopped evaluation again, with the visitor's keys for its endpoints."""
        job = self.jobs.get(run_id)
        if job.kind != KIND:
            raise JobError(f"Job {run_id} is not an evaluation run.")
        return self.jobs.resume(job.id, visitor, keys_for(EvalSpec.from_dict(job.spec), keys))

    def runs(self) -> list[EvalRunRecord]:
        return self.store.list_eval_runs()

    def started(self, run_id: str) -> bool:
        """A queued run has a job but no run row yet."""
        return self.store.get_eval_run(check_id(run_id, "Run id")) is not None

    def summary(self, run_id: str, n_boot: int = evalstats.N_BOOTSTRAP) -> list[dict[str, Any]]:
        """evalstats.summarize_run's rows, each with its metric's score range (score_min,
        score_max) from the run's spec, so a chart can draw it on a fixed scale."""
        if not self.started(run_id):
            return []
        ranges = score_ranges(self.store.get_eval_run(run_id).spec)
        return [{**row, **ranges.get(row["metric"], {})}
                for row in evalstats.summarize_run(self.store, run_id, n_boot=n_boot)]

    def items(self, run_id: str) -> list[dict[str, Any]]:
        return self.store.eval_items(run_id) if self.started(run_id) else []

    def item(self, run_id: str, example_id: str, system_id: str, metric: str) -> dict[str, Any]:
        """One item's answer and every judgment of it on one metric (replies, scores, reasoning)."""
        rows = self.store.eval_items(check_id(run_id, "Run id"), system_id, metric)
        row = next((r for r in rows if r["example_id"] == example_id), None)
        if row is None:
            raise ValueError(f"Run '{run_id}' has no judged item '{example_id}' for that system.")
        answer = next((a for a in self.store.eval_answers(run_id)
                       if a["example_id"] == example_id and a["system_id"] == system_id), {})
        judgments = [j for j in self.store.eval_judgments(run_id)
                     if j["example_id"] == example_id and j["system_id"] == system_id
                     and j["metric"] == metric]
        return {"question": row["question"], "reference": row["reference"], "system": row["system"],
                "answer": row["answer"], "retrieved": answer.get("retrieved"),
                "judgments": [{k: j[k] for k in ("repeat", "method", "score", "distribution",
                                                 "parsed_scores", "raw", "reasoning",
                                                 "parse_failures")} for j in judgments]}

    def export(self, run_id: str, fmt: str) -> list[Path]:
        return self.store.export_eval_run(check_id(run_id, "Run id"), config.subdir("exports"), fmt)

    def compare(self, run_a: str, run_b: str, n_boot: int = evalstats.N_BOOTSTRAP) -> list[dict[str, Any]]:
        return evalstats.compare_runs(self.store, check_id(run_a, "Run A"), check_id(run_b, "Run B"),
                                      n_boot=n_boot)

    def study_rows(self, n_boot: int = 200) -> list[dict[str, Any]]:
        """The study's figures as rows: per dataset, training-set size (the adapter's n_train; 0
        for the base model), system ("base" or "fine-tuned"), RAG or not and metric, the mean with
        its 95% t interval, n items, the metric's score range and the run it comes from.

        Each of those keys appears ONCE: when several runs scored it (say, a rerun with a stronger
        judge), the newest run's numbers are kept (and of two adapters of one size in one run, the
        first listed). Runs are not pooled because different runs may
        use different judges, decodings or items, whose scores do not average into one number."""
        n_train = {a.name: (a.metrics or {}).get("n_train") for a in self._adapter_rows()}
        rows: dict[tuple, dict[str, Any]] = {}
        for run in self.runs():  # newest first: the first row for a key wins
            spec = run.spec or {}
            systems = {d["id"]: System.from_fields(d) for d in spec.get("systems", []) if "id" in d}
            ranges = score_ranges(spec)
            for s in evalstats.summarize_run(self.store, run.id, n_boot=n_boot):
                system = systems.get(s["system_id"])
                if system is None or s["mean"] is None:
                    continue
                row = {"dataset": run.dataset_id,
                       "n_train": 0 if system.is_base else int(n_train.get(system.adapter) or 0),
                       "system": "base" if system.is_base else "fine-tuned", "rag": system.rag,
                       "metric": s["metric"], "mean": s["mean"], "ci_low": s["ci_low"],
                       "ci_high": s["ci_high"], "n": s["n"], **ranges.get(s["metric"], {}),
                       "run": run.name or run.id}
                rows.setdefault(tuple(row[k] for k in ("dataset", "n_train", "system", "rag",
                                                      "metric")), row)
        return list(rows.values())

    example_queries = EXAMPLE_QUERIES

    def sql(self, query: str) -> SqlResult:
        """A visitor's query, run in the sandbox (refusals raise core.sqlbox.ReadOnlyQueryError)."""
        return self.sql_box.run(query)

    def record_vote(self, question: str, systems: list[System], answers: list[str], choice: str,
                    decoding: dict[str, Any], retrieved: list[dict[str, Any]]) -> str:
        """A person's verdict on two answers; systems are stored with their ids and labels."""
        return self.store.add_vote(question, [{**s.fields(), "id": s.id, "label": s.label}
                                              for s in systems], answers, choice, decoding, retrieved)


def score_ranges(spec: dict[str, Any]) -> dict[str, dict[str, int]]:
    """{metric name: {"score_min": .., "score_max": ..}} for the metrics of a stored run spec."""
    metrics = [metric_from(m) for m in (spec or {}).get("metrics", [])]
    return {m.name: {"score_min": m.score_min, "score_max": m.score_max} for m in metrics}

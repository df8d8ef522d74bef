"""Judging answers: G-Eval runs (jobs/evaluate), their systems, answers and judgments, the
evaluation-steps cache (core/geval.py), a run's export, and the Compare tab's votes.

Keys: answers (run_id, example_id, system_id); judgments (run_id, example_id, system_id, metric,
repeat); inserts never overwrite, so a resumed run cannot duplicate or change finished work.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

from core.names import inside, new_id
from core.records import EvalRunRecord
from core.store.database import Database, now

# An eval run's row with its stored answer and judgment counts (core.records.EvalRunRecord).
EVAL_RUN_SELECT = ("SELECT r.*, (SELECT count(*) FROM answers a WHERE a.run_id = r.id) AS n_answers, "
                   "(SELECT count(*) FROM judgments g WHERE g.run_id = r.id) AS n_judgments "
                   "FROM eval_runs r")


class EvalTables(Database):
    # -- G-Eval runs ------------------------------------------------------------------------
    def get_geval_steps(self, metric: str, judge: str, criteria_hash: str) -> str | None:
        rows = self.query("SELECT steps FROM geval_steps WHERE metric = ? AND judge = ? AND "
                          "criteria_hash = ?", [metric, judge, criteria_hash])
        return rows[0]["steps"] if rows else None

    def save_geval_steps(self, metric: str, judge: str, criteria_hash: str, steps: str,
                         source: str) -> None:
        self.execute(
            "INSERT INTO geval_steps (metric, judge, criteria_hash, steps, source, created_at) "
            "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (metric, judge, criteria_hash) DO UPDATE SET "
            "steps = excluded.steps, source = excluded.source, created_at = excluded.created_at",
            [metric, judge, criteria_hash, steps, source, now()])

    def list_geval_steps(self) -> list[dict[str, Any]]:
        return self.query("SELECT * FROM geval_steps ORDER BY metric, judge, created_at DESC")

    def create_eval_run(self, run_id: str, job_id: str | None, name: str, dataset_id: str,
                        spec: dict[str, Any]) -> EvalRunRecord:
        """Insert the run unless it exists; returns the stored row (a resume gets the original)."""
        self.execute(
            "INSERT INTO eval_runs (id, job_id, name, dataset_id, spec, status, created_at, "
            "updated_at) VALUES (?, ?, ?, ?, ?, 'running', ?, ?) ON CONFLICT (id) DO NOTHING",
            [run_id, job_id, name, dataset_id, json.dumps(spec), now(), now()])
        return self.get_eval_run(run_id)

    def get_eval_run(self, run_id: str) -> EvalRunRecord | None:
        rows = self.query(f"{EVAL_RUN_SELECT} WHERE r.id = ?", [run_id])
        return EvalRunRecord.from_row(rows[0]) if rows else None

    def set_eval_run_status(self, run_id: str, status: str) -> None:
        self.execute("UPDATE eval_runs SET status = ?, updated_at = ? WHERE id = ?",
                     [status, now(), run_id])

    def list_eval_runs(self, limit: int = 100) -> list[EvalRunRecord]:
        """Newest first, with answer/judgment counts (the job's progress is on its JobRecord)."""
        rows = self.query(f"{EVAL_RUN_SELECT} ORDER BY r.created_at DESC LIMIT ?", [limit])
        return [EvalRunRecord.from_row(r) for r in rows]

    def delete_eval_run(self, run_id: str) -> None:
        with self.transaction() as cur:
            for table, key in (("judgments", "run_id"), ("answers", "run_id"), ("eval_runs", "id")):
                cur.execute(f"DELETE FROM {table} WHERE {key} = ?", [run_id])

    def save_systems(self, systems: list[Any]) -> None:
        """Record each core.systems.System under its id (the label is refreshed, never a key)."""
        for system in systems:
            self.execute(
                "INSERT INTO systems (id, kind, model, adapter, rag, base_url, pipeline, label, "
                "created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET "
                "label = excluded.label",
                [system.id, system.kind, system.model, system.adapter, system.rag, system.base_url,
                 system.pipeline, system.label, now()])

    def save_answer(self, run_id: str, example_id: str, system_id: str, answer: str, prompt: Any,
                    retrieved: Any, prompt_tokens: int, new_tokens: int, seconds: float,
                    error: str | None = None) -> None:
        self.execute(
            "INSERT INTO answers (run_id, example_id, system_id, answer, prompt, retrieved, "
            "prompt_tokens, new_tokens, seconds, error, created_at) VALUES "
            "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
            [run_id, example_id, system_id, answer, _json_or_null(prompt), _json_or_null(retrieved),
             prompt_tokens, new_tokens, seconds, error, now()])

    def answer_keys(self, run_id: str) -> set[tuple[str, str]]:
        rows = self.query("SELECT example_id, system_id FROM answers WHERE run_id = ?", [run_id])
        return {(r["example_id"], r["system_id"]) for r in rows}

    def eval_answers(self, run_id: str) -> list[dict[str, Any]]:
        rows = self.query("SELECT a.*, s.label AS system FROM answers a LEFT JOIN systems s ON "
                          "s.id = a.system_id WHERE a.run_id = ? ORDER BY a.example_id, a.system_id",
                          [run_id])
        return [_decode_json(r, ("retrieved",)) for r in rows]

    def save_judgment(self, run_id: str, example_id: str, system_id: str, repeat: int,
                      judgment: dict[str, Any]) -> None:
        """`judgment`: metric, method, judge, prompt_hash, raw, parsed_scores, distribution,
        score, parse_failures, reasoning, mass (core.geval.Judgment.to_row())."""
        j = judgment
        self.execute(
            "INSERT INTO judgments (run_id, example_id, system_id, metric, repeat, method, judge, "
            "prompt_hash, raw, parsed_scores, distribution, score, parse_failures, reasoning, "
            "mass, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT DO NOTHING",
            [run_id, example_id, system_id, j["metric"], repeat, j["method"], j["judge"],
             j["prompt_hash"], _json_or_null(j["raw"]), _json_or_null(j["parsed_scores"]),
             _json_or_null(j["distribution"]), j["score"], j["parse_failures"], j["reasoning"],
             j["mass"], now()])

    def judgment_keys(self, run_id: str) -> set[tuple[str, str, str, int]]:
        rows = self.query("SELECT example_id, system_id, metric, repeat FROM judgments "
                          "WHERE run_id = ?", [run_id])
        return {(r["example_id"], r["system_id"], r["metric"], r["repeat"]) for r in rows}

    def eval_judgments(self, run_id: str) -> list[dict[str, Any]]:
        """Every judgment of a run with its system's label as `system` (the input of
        core.evalstats.summarize, which keys on system_id)."""
        rows = self.query("SELECT j.*, s.label AS system FROM judgments j LEFT JOIN systems s ON "
                          "s.id = j.system_id WHERE j.run_id = ? ORDER BY j.system_id, j.metric, "
                          "j.example_id, j.repeat", [run_id])
        return [_decode_json(r, ("raw", "parsed_scores", "distribution")) for r in rows]

    def eval_running_means(self, run_id: str) -> list[dict[str, Any]]:
        """Mean over items of each item's mean score so far, per (system, metric); the same rule
        as core.evalstats (parse failures left out)."""
        return self.query(
            "SELECT i.system_id, s.label AS system, i.metric, avg(i.item_score) AS mean, "
            "count(*) AS n FROM (SELECT system_id, metric, example_id, avg(score) AS item_score "
            "FROM judgments WHERE run_id = ? AND score IS NOT NULL GROUP BY ALL) i "
            "LEFT JOIN systems s ON s.id = i.system_id GROUP BY ALL ORDER BY i.system_id, i.metric",
            [run_id])

    def eval_items(self, run_id: str, system_id: str | None = None,
                   metric: str | None = None) -> list[dict[str, Any]]:
        """Drill-down: one row per (item, system, metric) with the question, reference answer,
        the system's answer, the mean score over repeats, every repeat's score and failures."""
        where, params = ["g.run_id = ?"], [run_id]
        for column, value in (("g.system_id", system_id), ("g.metric", metric)):
            if value is not None:
                where.append(f"{column} = ?")
                params.append(value)
        return self.query(
            "SELECT g.example_id, g.system_id, s.label AS system, g.metric, e.question, "
            "e.answer AS reference, a.answer, avg(g.score) AS score, "
            "list(g.score ORDER BY g.repeat) AS scores, "
            "count(*) AS judgments, sum(g.parse_failures) AS parse_failures, "
            "any_value(g.method) AS method, any_value(g.reasoning) AS reasoning "
            "FROM judgments g JOIN eval_runs r ON r.id = g.run_id "
            "LEFT JOIN systems s ON s.id = g.system_id "
            "LEFT JOIN answers a ON a.run_id = g.run_id AND a.example_id = g.example_id "
            "AND a.system_id = g.system_id "
            "LEFT JOIN examples e ON e.dataset_id = r.dataset_id AND e.id = g.example_id "
            f"WHERE {' AND '.join(where)} "
            "GROUP BY ALL ORDER BY g.system_id, g.metric, g.example_id", params)

    def export_eval_run(self, run_id: str, folder: str | Path, fmt: str = "csv") -> list[Path]:
        """Write the run's answers and judgments as <run>_answers.<fmt> and <run>_judgments.<fmt>."""
        if fmt not in ("csv", "parquet"):
            raise ValueError(f"Export format must be csv or parquet, not '{fmt}'.")
        if self.get_eval_run(run_id) is None:
            raise ValueError(f"No evaluation run with id '{run_id}'.")
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        paths = []
        for table in ("answers", "judgments"):
            path = inside(folder, f"{run_id}_{table}.{fmt}")
            relation = self._cursor().sql(
                f"SELECT * FROM {table} WHERE run_id = ? ORDER BY ALL", params=[run_id])
            (relation.write_csv if fmt == "csv" else relation.write_parquet)(str(path))
            paths.append(path)
        return paths

    # -- votes ------------------------------------------------------------------------------
    def add_vote(self, question: str, systems: list[Any], answers: list[str], choice: str,
                 decoding: dict[str, Any] | None = None, retrieved: list[Any] | None = None) -> str:
        vote_id = new_id("vote")
        self.execute(
            "INSERT INTO votes (id, question, systems, answers, decoding, retrieved, choice, "
            "created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [vote_id, question, json.dumps(systems), json.dumps(answers), json.dumps(decoding),
             json.dumps(retrieved), choice, now()],
        )
        return vote_id


def _json_or_null(value: Any) -> str | None:
    return None if value is None else json.dumps(value)


def _decode_json(row: dict[str, Any], columns: Iterable[str]) -> dict[str, Any]:
    for col in columns:
        if isinstance(row.get(col), str):
            row[col] = json.loads(row[col])
    return row

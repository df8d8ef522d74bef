"""Systems get stable ids: answers and judgments are keyed by system_id instead of a display label.

A new `systems` table holds each system's fields (kind, model, adapter, rag, base_url, pipeline)
and its current label. Existing rows are converted through their run's spec, which lists every
system with the label it was stored under; RAG systems take the run's pipeline. A label that no
run spec explains keeps its rows under a 'legacy-' id rather than losing them.
"""
from __future__ import annotations

import json

from core.systems import System

SYSTEMS = """
CREATE TABLE systems (
    id          VARCHAR PRIMARY KEY,       -- sys- + 16 hex digits of sha256(canonical fields)
    kind        VARCHAR NOT NULL,          -- local | openai
    model       VARCHAR NOT NULL,
    adapter     VARCHAR NOT NULL,          -- __base__ = the plain base model
    rag         BOOLEAN NOT NULL,
    base_url    VARCHAR,
    pipeline    VARCHAR,                   -- the saved pipeline a RAG system retrieves with
    label       VARCHAR NOT NULL,          -- for display only; never a key
    created_at  TIMESTAMP NOT NULL DEFAULT current_timestamp
)"""

ANSWERS = """
CREATE TABLE answers_v4 (
    run_id         VARCHAR NOT NULL,
    example_id     VARCHAR NOT NULL,
    system_id      VARCHAR NOT NULL,
    answer         VARCHAR,
    prompt         VARCHAR,
    retrieved      JSON,
    prompt_tokens  INTEGER,
    new_tokens     INTEGER,
    seconds        DOUBLE,
    error          VARCHAR,
    created_at     TIMESTAMP NOT NULL DEFAULT current_timestamp,
    PRIMARY KEY (run_id, example_id, system_id)
)"""

JUDGMENTS = """
CREATE TABLE judgments_v4 (
    run_id          VARCHAR NOT NULL,
    example_id      VARCHAR NOT NULL,
    system_id       VARCHAR NOT NULL,
    metric          VARCHAR NOT NULL,
    repeat          INTEGER NOT NULL,
    method          VARCHAR NOT NULL,
    judge           VARCHAR NOT NULL,
    prompt_hash     VARCHAR,
    raw             JSON,
    parsed_scores   JSON,
    distribution    JSON,
    score           DOUBLE,
    parse_failures  INTEGER NOT NULL DEFAULT 0,
    reasoning       VARCHAR,
    mass            DOUBLE,
    created_at      TIMESTAMP NOT NULL DEFAULT current_timestamp,
    PRIMARY KEY (run_id, example_id, system_id, metric, repeat)
)"""

_ID = "coalesce(m.system_id, 'legacy-' || t.system)"
_JOIN = "LEFT JOIN system_map m ON m.run_id = t.run_id AND m.label = t.system"


def migrate(cur) -> None:
    cur.execute(SYSTEMS)
    cur.execute("CREATE TEMP TABLE system_map (run_id VARCHAR, label VARCHAR, system_id VARCHAR)")
    for run_id, raw in cur.execute("SELECT id, spec FROM eval_runs").fetchall():
        spec = json.loads(raw) if raw else {}
        converted = []
        for stored in spec.get("systems") or []:
            system = System.from_fields({**stored, "pipeline": stored.get("pipeline") or spec.get("pipeline")})
            cur.execute("INSERT INTO systems (id, kind, model, adapter, rag, base_url, pipeline, label) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                        [system.id, system.kind, system.model, system.adapter, system.rag,
                         system.base_url, system.pipeline, system.label])
            if stored.get("label"):
                cur.execute("INSERT INTO system_map VALUES (?, ?, ?)", [run_id, stored["label"], system.id])
            converted.append({**system.fields(), "id": system.id, "label": system.label})
        spec["systems"] = converted
        cur.execute("UPDATE eval_runs SET spec = ? WHERE id = ?", [json.dumps(spec), run_id])
    cur.execute(ANSWERS)
    cur.execute(f"INSERT INTO answers_v4 SELECT t.run_id, t.example_id, {_ID}, t.answer, t.prompt, "
                f"t.retrieved, t.prompt_tokens, t.new_tokens, t.seconds, t.error, t.created_at "
                f"FROM answers t {_JOIN}")
    cur.execute(JUDGMENTS)
    cur.execute(f"INSERT INTO judgments_v4 SELECT t.run_id, t.example_id, {_ID}, t.metric, t.repeat, "
                f"t.method, t.judge, t.prompt_hash, t.raw, t.parsed_scores, t.distribution, t.score, "
                f"t.parse_failures, t.reasoning, t.mass, t.created_at FROM judgments t {_JOIN}")
    for table in ("answers", "judgments"):
        cur.execute(f"DROP TABLE {table}")
        cur.execute(f"ALTER TABLE {table}_v4 RENAME TO {table}")
    cur.execute("DROP TABLE system_map")

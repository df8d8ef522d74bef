-- The tables users query (read-only SQL box, `duckdb data/runtime/app.duckdb`): keep names stable;
-- change them only by a new numbered migration.
CREATE TABLE datasets (
    id          VARCHAR PRIMARY KEY,       -- e.g. sample:bioasq, hub:allenai/qasper, upload:faq.csv
    name        VARCHAR NOT NULL,
    source      VARCHAR NOT NULL,
    n_examples  INTEGER NOT NULL,
    n_passages  INTEGER NOT NULL,
    meta        JSON,
    created_at  TIMESTAMP NOT NULL DEFAULT current_timestamp
);

CREATE TABLE examples (
    dataset_id  VARCHAR NOT NULL,
    id          VARCHAR NOT NULL,
    question    VARCHAR NOT NULL,
    answer      VARCHAR NOT NULL,
    contexts    VARCHAR[],
    split       VARCHAR NOT NULL,          -- train | eval, from a seeded hash of the id
    meta        JSON,
    PRIMARY KEY (dataset_id, id)
);

CREATE TABLE pipelines (
    name           VARCHAR PRIMARY KEY,
    spec           JSON NOT NULL,
    haystack_yaml  VARCHAR,
    created_at     TIMESTAMP NOT NULL DEFAULT current_timestamp,
    updated_at     TIMESTAMP NOT NULL DEFAULT current_timestamp
);

CREATE TABLE adapters (
    name        VARCHAR PRIMARY KEY,
    base_model  VARCHAR NOT NULL,
    path        VARCHAR NOT NULL,
    spec        JSON,
    metrics     JSON,
    job_id      VARCHAR,
    created_at  TIMESTAMP NOT NULL DEFAULT current_timestamp
);

CREATE TABLE jobs (
    id           VARCHAR PRIMARY KEY,
    kind         VARCHAR NOT NULL,         -- finetune | evaluate | index | ...
    status       VARCHAR NOT NULL,         -- queued | running | done | failed | cancelled | interrupted
    progress     DOUBLE NOT NULL DEFAULT 0,
    message      VARCHAR,
    eta_seconds  DOUBLE,
    spec         JSON,
    result       JSON,
    error        VARCHAR,
    attempts     INTEGER NOT NULL DEFAULT 0,
    created_at   TIMESTAMP NOT NULL DEFAULT current_timestamp,
    started_at   TIMESTAMP,
    updated_at   TIMESTAMP,
    finished_at  TIMESTAMP
);

CREATE TABLE eval_runs (
    id          VARCHAR PRIMARY KEY,
    job_id      VARCHAR,
    name        VARCHAR,
    dataset_id  VARCHAR,
    spec        JSON,
    status      VARCHAR,
    created_at  TIMESTAMP NOT NULL DEFAULT current_timestamp
);

CREATE TABLE answers (
    run_id         VARCHAR NOT NULL,
    example_id     VARCHAR NOT NULL,
    system         VARCHAR NOT NULL,
    answer         VARCHAR,
    prompt         VARCHAR,
    retrieved      JSON,
    prompt_tokens  INTEGER,
    new_tokens     INTEGER,
    seconds        DOUBLE,
    error          VARCHAR,
    created_at     TIMESTAMP NOT NULL DEFAULT current_timestamp,
    PRIMARY KEY (run_id, example_id, system)
);

CREATE TABLE judgments (
    run_id          VARCHAR NOT NULL,
    example_id      VARCHAR NOT NULL,
    system          VARCHAR NOT NULL,
    metric          VARCHAR NOT NULL,
    repeat          INTEGER NOT NULL,
    method          VARCHAR NOT NULL,      -- logprobs | sampling (| sampling-fallback)
    judge           VARCHAR NOT NULL,
    prompt_hash     VARCHAR,
    raw             JSON,                  -- the judge's reply or replies, verbatim
    parsed_scores   JSON,                  -- one per sample; null where a reply could not be parsed
    distribution    JSON,                  -- score -> probability (logprobs) or frequency (sampling)
    score           DOUBLE,                -- weighted score (logprobs) or mean of parsed samples
    parse_failures  INTEGER NOT NULL DEFAULT 0,
    reasoning       VARCHAR,
    created_at      TIMESTAMP NOT NULL DEFAULT current_timestamp,
    PRIMARY KEY (run_id, example_id, system, metric, repeat)
);

CREATE TABLE votes (
    id          VARCHAR PRIMARY KEY,
    question    VARCHAR NOT NULL,
    systems     JSON NOT NULL,
    answers     JSON NOT NULL,
    decoding    JSON,
    retrieved   JSON,
    choice      VARCHAR NOT NULL,          -- A | B | tie | all_bad
    created_at  TIMESTAMP NOT NULL DEFAULT current_timestamp
);

-- G-Eval: evaluation steps cached per (metric, judge, criteria), and the slot probability mass.
CREATE TABLE geval_steps (
    metric         VARCHAR NOT NULL,
    judge          VARCHAR NOT NULL,       -- e.g. local:smollm2-135m-instruct, openai:gpt-4o@https://...
    criteria_hash  VARCHAR NOT NULL,       -- sha256 of criteria + score range: edited criteria, new steps
    steps          VARCHAR NOT NULL,
    source         VARCHAR NOT NULL,       -- generated (by the judge) | user (edited)
    created_at     TIMESTAMP NOT NULL DEFAULT current_timestamp,
    PRIMARY KEY (metric, judge, criteria_hash)
);

-- logprobs judgments: total probability of the allowed scores at the slot before normalizing
-- (low means the judge wanted to write something else there). NULL for sampling.
ALTER TABLE judgments ADD COLUMN mass DOUBLE;

ALTER TABLE eval_runs ADD COLUMN updated_at TIMESTAMP;

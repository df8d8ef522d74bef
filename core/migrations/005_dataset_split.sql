-- One split setting per dataset, as columns: fine-tuning and evaluation both read it from here.
ALTER TABLE datasets ADD COLUMN split_seed INTEGER;
ALTER TABLE datasets ADD COLUMN eval_fraction DOUBLE;
UPDATE datasets SET split_seed = coalesce(CAST(json_extract_string(meta, '$.split_seed') AS INTEGER), 0),
                    eval_fraction = coalesce(CAST(json_extract_string(meta, '$.eval_fraction') AS DOUBLE), 0.3);

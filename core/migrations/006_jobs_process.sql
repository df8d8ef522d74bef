-- The child process of a running subprocess job (fine-tuning): its pid and process group, kept
-- while it runs so that a restarted app can stop a child its predecessor left behind.
ALTER TABLE jobs ADD COLUMN pid INTEGER;
ALTER TABLE jobs ADD COLUMN pgid INTEGER;

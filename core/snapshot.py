"""A snapshot of the results in a plain folder, and the restore that rebuilds a data dir from one.

What a snapshot holds: every table as `tables/<name>.parquet`, read in one transaction so that
all of them show the database as of one moment while jobs go on writing; the adapters this app
trained, as `adapters/<name>/` with only the files an adapter is (ADAPTER_FILES: weights, config,
spec, training ids, metrics; never checkpoints or anything else in the folder); the saved
pipeline specs (`pipelines/<name>.json` and `.yaml`; indexes are rebuilt, not kept); and
`manifest.json`, written last, naming the schema version, the tables with their row counts, the
adapters with their files and the pipeline files. The manifest is what a restore follows: files it does not name
(an adapter deleted since, left in a dataset repo that only ever adds files) are ignored.

A restore builds the database in a temporary file next to the real one, with the migrations up
to the snapshot's version, loads the Parquet files, runs the later migrations, and only then
renames it into place: a data dir has the whole database or none. core.persistence puts this on
a Hugging Face dataset repo; nothing here touches the network.
"""
from __future__ import annotations

import filecmp
import json
import logging
import os
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from core import config
from core.names import check_name, inside
from core.store import Store, migrations
from core.testhooks import gate

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT = 1
TABLES = "tables"
ADAPTERS = "adapters"
PIPELINES = "pipelines"
PIPELINE_SUFFIXES = (".json", ".yaml")
# The files that make an adapter (jobs.finetune writes them); metrics.json means it finished.
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json", "spec.json", "train_ids.json",
                 "metrics.json")
# Rebuilt by the migrations themselves, never copied.
NOT_COPIED = frozenset({"schema_migrations"})


class SnapshotError(RuntimeError):
    """A snapshot that cannot be written or restored; the message says why."""


def _quoted(path: Path) -> str:
    return "'" + str(path).replace("'", "''") + "'"


def _replace_if_changed(tmp: Path, target: Path) -> None:
    """Move `tmp` onto `target` unless they hold the same bytes. An unchanged file keeps its
    modification time, so a scheduled upload (CommitScheduler) skips it."""
    if target.is_file() and filecmp.cmp(tmp, target, shallow=False):
        tmp.unlink()
    else:
        os.replace(tmp, target)


def _write_tables(store: Store, folder: Path) -> tuple[int, dict[str, int], list[dict[str, Any]]]:
    """(schema version, rows per table, the adapters table's rows), every table written as Parquet
    under `folder`, all read in one transaction."""
    folder.mkdir(parents=True, exist_ok=True)
    counts: dict[str, int] = {}
    with store.read_transaction() as cur:
        version = cur.execute("SELECT max(version) FROM schema_migrations").fetchone()[0] or 0
        names = [row[0] for row in cur.execute(
            "SELECT table_name FROM duckdb_tables() WHERE database_name = current_database() "
            "AND schema_name = 'main' ORDER BY table_name").fetchall()]
        adapters = [dict(zip(("name", "path"), row))
                    for row in cur.execute("SELECT name, path FROM adapters ORDER BY name").fetchall()]
        for i, name in enumerate(n for n in names if n not in NOT_COPIED):
            if i == 1:
                gate("snapshot-tables")  # tests write here, between two tables of one snapshot
            tmp = folder / f"{name}.parquet.tmp"
            # ORDER BY ALL: the same rows give the same bytes, so an unchanged table is not uploaded.
            cur.execute(f'COPY (SELECT * FROM "{name}" ORDER BY ALL) TO {_quoted(tmp)} (FORMAT parquet)')
            counts[name] = cur.execute(f'SELECT count(*) FROM "{name}"').fetchone()[0]
            _replace_if_changed(tmp, folder / f"{name}.parquet")
    return version, counts, adapters


def _copy_adapters(rows: list[dict[str, Any]], adapters_root: Path, folder: Path) -> dict[str, list[str]]:
    """The finished adapters this app trained (their folder is adapters_root/<name>), copied into
    `folder`: only ADAPTER_FILES. Imported adapters (hub ids, folders elsewhere) stay where they
    are: their rows still name them."""
    copied: dict[str, list[str]] = {}
    root = adapters_root.resolve()
    for row in rows:
        source = Path(row["path"])
        if source.resolve() != root / row["name"] or not (source / "metrics.json").is_file():
            continue
        target = folder / row["name"]
        target.mkdir(parents=True, exist_ok=True)
        files = [f for f in ADAPTER_FILES if (source / f).is_file()]
        for name in files:
            _copy_file(source / name, target / name)
        copied[row["name"]] = files
    return copied


def _copy_file(source: Path, target: Path) -> None:
    tmp = target.with_name(target.name + ".tmp")
    shutil.copyfile(source, tmp)
    _replace_if_changed(tmp, target)


def _pipeline_files(folder: Path) -> list[str]:
    """The saved pipeline specs in `folder` whose names pass the name rule."""
    return sorted(p.name for p in folder.glob("*") if p.is_file() and p.suffix in PIPELINE_SUFFIXES
                  and _is_name(p.stem)) if folder.is_dir() else []


def _is_name(text: str) -> bool:
    try:
        check_name(text, "Name")
    except ValueError:
        return False
    return True


def write_snapshot(store: Store, data_dir: Path, folder: Path) -> dict[str, Any]:
    """Write (or bring up to date) the snapshot of `store` and the files under `data_dir` in
    `folder`; returns its manifest. Files whose content did not change are left alone."""
    folder, data_dir = Path(folder), Path(data_dir)
    version, counts, adapter_rows = _write_tables(store, folder / TABLES)
    adapters = _copy_adapters(adapter_rows, data_dir / ADAPTERS, folder / ADAPTERS)
    pipelines = _pipeline_files(data_dir / PIPELINES)
    if pipelines:
        (folder / PIPELINES).mkdir(parents=True, exist_ok=True)
    for name in pipelines:
        _copy_file(data_dir / PIPELINES / name, folder / PIPELINES / name)
    manifest = {"format": FORMAT, "schema_version": version, "tables": counts, "adapters": adapters,
                "pipelines": pipelines}
    old = read_manifest(folder) if (folder / MANIFEST).is_file() else None
    if old is None or {k: old.get(k) for k in manifest} != manifest:
        tmp = folder / f"{MANIFEST}.tmp"
        stamped = {**manifest, "written_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        tmp.write_text(json.dumps(stamped, indent=2), encoding="utf-8")
        os.replace(tmp, folder / MANIFEST)
    logger.info("snapshot in %s: %d tables, %d rows, %d adapters", folder, len(counts),
                sum(counts.values()), len(adapters))
    return manifest


def read_manifest(folder: Path) -> dict[str, Any]:
    path = Path(folder) / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise SnapshotError(f"The snapshot's {MANIFEST} cannot be read ({exc}).") from exc
    if manifest.get("format") != FORMAT:
        raise SnapshotError(f"The snapshot has format {manifest.get('format')!r}; this app reads {FORMAT}.")
    return manifest


def restore_snapshot(folder: Path, data_dir: Path) -> dict[str, Any]:
    """Rebuild the database (config.DB_FILE, which must not exist yet), the adapters and the
    pipeline specs under `data_dir` from the snapshot in `folder`; returns its manifest."""
    folder, data_dir = Path(folder), Path(data_dir)
    db_path, adapters_root = data_dir / config.DB_FILE, data_dir / ADAPTERS
    if db_path.exists():
        raise SnapshotError(f"{db_path} exists: a restore never overwrites a database.")
    manifest = read_manifest(folder)
    version, newest = manifest["schema_version"], max(v for v, _, _ in migrations())
    if version > newest:
        raise SnapshotError(f"The snapshot has schema version {version}; this app knows up to "
                            f"{newest}. Update the app first.")
    adapters = {check_name(name, "Adapter name in the snapshot"): files
                for name, files in manifest["adapters"].items()}
    pipelines = manifest.get("pipelines", [])
    for name in pipelines:
        if Path(name).suffix not in PIPELINE_SUFFIXES:
            raise SnapshotError(f"The snapshot names an unexpected pipeline file '{name}'.")
        check_name(Path(name).stem, "Pipeline name in the snapshot")
    tmp = db_path.with_name(db_path.name + ".restoring")
    for stale in (tmp, tmp.with_name(tmp.name + ".wal")):
        stale.unlink(missing_ok=True)
    try:
        _load_tables(folder / TABLES, tmp, manifest, {name: str(inside(adapters_root, name)) for name in adapters})
        for name, files in adapters.items():
            target = inside(adapters_root, name)
            target.mkdir(parents=True, exist_ok=True)
            for file in files:
                if file not in ADAPTER_FILES:
                    raise SnapshotError(f"The snapshot's adapter '{name}' names an unexpected file '{file}'.")
                shutil.copyfile(inside(folder / ADAPTERS, name, file), target / file)
        if pipelines:
            (data_dir / PIPELINES).mkdir(parents=True, exist_ok=True)
        for name in pipelines:
            shutil.copyfile(inside(folder / PIPELINES, name), inside(data_dir / PIPELINES, name))
        os.replace(tmp, db_path)  # the database appears whole, or not at all
    finally:
        tmp.unlink(missing_ok=True)
    logger.info("restored %d tables (%d rows) and %d adapters from %s", len(manifest["tables"]),
                sum(manifest["tables"].values()), len(adapters), folder)
    return manifest


def _load_tables(tables: Path, db_file: Path, manifest: dict[str, Any], adapter_paths: dict[str, str]) -> None:
    """The snapshot's rows in a new database at `db_file`: loaded under the schema they were
    written with, then migrated to the current one."""
    store = Store(db_file, upto=manifest["schema_version"])
    try:
        known = {r["table_name"] for r in store.query(
            "SELECT table_name FROM duckdb_tables() WHERE database_name = current_database()")}
        with store.transaction() as cur:
            for name, rows in manifest["tables"].items():
                if name not in known:
                    raise SnapshotError(f"The snapshot has a table '{name}' that its schema version "
                                        f"{manifest['schema_version']} does not have.")
                path = tables / f"{name}.parquet"
                if not path.is_file():
                    raise SnapshotError(f"The snapshot lacks {path.name}.")
                cur.execute(f'INSERT INTO "{name}" BY NAME SELECT * FROM read_parquet(?)', [str(path)])
                loaded = cur.execute(f'SELECT count(*) FROM "{name}"').fetchone()[0]
                if loaded != rows:
                    raise SnapshotError(f"{path.name} holds {loaded} rows; the manifest says {rows}.")
            # The adapters' files come back under this data dir, wherever the old one was.
            for name, path in adapter_paths.items():
                cur.execute("UPDATE adapters SET path = ? WHERE name = ?", [path, name])
    finally:
        store.close()
    store = Store(db_file)  # the migrations that came after the snapshot
    try:
        # A process id from the machine that wrote the snapshot names nobody here.
        store.execute("UPDATE jobs SET pid = NULL, pgid = NULL")
    finally:
        store.close()

"""The DuckDB file of the app and the SQL the app runs on it (visitors' SQL runs in core/sqlbox.py,
the snapshot's table dumps in core/snapshot.py). One module per group of tables, each a class of
methods:

  database.py  the connection: per-thread cursors, the write lock, transaction(), the numbered
               migrations (core/migrations/), copy_to (the SQL box's copy)
  jobs.py      jobs
  catalog.py   datasets + examples, pipelines, adapters
  evals.py     G-Eval runs, systems, answers, judgments, the steps cache, exports; votes

Store is all of them on one connection; get_store() is the process-wide one.
"""
from __future__ import annotations

import threading

from core import config
from core.store.catalog import CatalogTables
from core.store.database import StoreLockedError, migrations, now
from core.store.evals import EvalTables
from core.store.jobs import JobTables

__all__ = ["Store", "StoreLockedError", "get_store", "migrations", "now"]


class Store(JobTables, CatalogTables, EvalTables):
    """Every table's queries on one DuckDB connection (Database.__init__ opens and migrates it)."""


_store: Store | None = None
_store_lock = threading.Lock()


def get_store() -> Store:
    """The process-wide store on config.db_path()."""
    global _store
    with _store_lock:
        if _store is None or _store.path != config.db_path():
            _store = Store()
        return _store

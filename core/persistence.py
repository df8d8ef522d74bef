"""Results that outlive a Space restart: the data dir's snapshot (core.snapshot) pushed to a Hugging
Face dataset repo the operator names, and restored from it at start.

- PERSIST_REPO=owner/name (the operator's own dataset repo, created private if missing) turns it
  on; the token is the operator's HF_TOKEN. PERSIST_EVERY_MIN (default 5) sets how often.
- At start, when the data dir has no database, the repo is downloaded into <data dir>/snapshot
  and restored (core.snapshot.restore_snapshot). An existing database is never replaced: the data
  dir (a mounted volume, or the files restored at the last start) is the truth.
- Then huggingface_hub's CommitScheduler writes the snapshot into that folder and uploads the
  files that changed, every PERSIST_EVERY_MIN minutes and once more at exit.
- If the restore fails, nothing is uploaded (an empty database must never overwrite the repo's
  results) and the app says so in its banner.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from huggingface_hub import CommitScheduler, snapshot_download
from huggingface_hub.errors import RepositoryNotFoundError

from core import config
from core.names import check_hub_id
from core.snapshot import MANIFEST, restore_snapshot, write_snapshot
from core.store import Store

logger = logging.getLogger(__name__)

EPHEMERAL = ("Results live on this Space's disk and **vanish when it restarts**: export them "
             "(Evaluate → Export answers and judgments), set `DATA_DIR` to a mounted volume, or "
             "`PERSIST_REPO` to a dataset repo (README, \"Duplicate this Space\").")


def repo_of(env: Mapping[str, str] = os.environ) -> str | None:
    """PERSIST_REPO (owner/name), or None when unset."""
    value = env.get("PERSIST_REPO", "").strip()
    return check_hub_id(value, "PERSIST_REPO") if value else None


def every_of(env: Mapping[str, str] = os.environ) -> float:
    """PERSIST_EVERY_MIN: minutes between uploads, default 5."""
    value = env.get("PERSIST_EVERY_MIN", "").strip() or "5"
    try:
        minutes = float(value)
    except ValueError:
        minutes = 0.0
    if not minutes > 0:
        raise ValueError(f"PERSIST_EVERY_MIN must be a number of minutes above 0, not '{value}'.")
    return minutes


def snapshot_dir() -> Path:
    return config.data_dir() / "snapshot"


class SnapshotScheduler(CommitScheduler):
    """CommitScheduler that brings the snapshot up to date before each upload. Uploads run one
    after another on the scheduler's own worker, so a snapshot is never rewritten mid-upload;
    unchanged files keep their time stamps and are not sent again."""

    def __init__(self, store: Store, data_dir: Path, **kwargs: Any) -> None:
        self.store, self.data_dir = store, Path(data_dir)
        super().__init__(repo_type="dataset", private=True, **kwargs)

    def push_to_hub(self) -> Any:
        write_snapshot(self.store, self.data_dir, self.folder_path)
        return super().push_to_hub()


@dataclass
class Persistence:
    """Where results are kept beyond this process, and what the app's banner says about it."""

    repo: str | None = None
    every: float = 5.0
    restored: dict[str, Any] | None = None
    error: str | None = None
    scheduler: SnapshotScheduler | None = field(default=None, repr=False)

    def banner(self, env: Mapping[str, str] = os.environ) -> str | None:
        """A line for the top of the app, or None when there is nothing to warn about."""
        if self.repo and not self.error:
            return (f"> Results are saved to the dataset repo **{self.repo}** every {self.every:g} "
                    "min and restored from it when the app restarts with an empty data dir.")
        lost = None if config.storage_persistent(env) else EPHEMERAL
        if self.repo:
            return f"> **Saving results to {self.repo} failed** ({self.error})." + (f" {lost}" if lost else "")
        return f"> {lost}" if lost else None

    def start(self, store: Store, token: str | None = None) -> None:
        """Upload the snapshot on schedule, unless the restore failed."""
        if not self.repo or self.error:
            return
        try:
            self.scheduler = SnapshotScheduler(store, config.data_dir(), repo_id=self.repo,
                                               folder_path=snapshot_dir(), every=self.every,
                                               token=token)
        except Exception as exc:  # a bad token, no network: the app runs, the banner says so
            logger.exception("cannot start saving results to %s", self.repo)
            self.error = _one_line(exc)


def restore_at_start(env: Mapping[str, str] = os.environ,
                     download: Callable[..., Any] = snapshot_download) -> Persistence:
    """Before the app opens its database: restore it from PERSIST_REPO when the data dir has none.
    `download` stands in for huggingface_hub.snapshot_download (tests pass a local copy)."""
    repo = repo_of(env)
    state = Persistence(repo=repo, every=every_of(env))
    if repo is None or config.db_path().exists():
        return state
    folder = snapshot_dir()
    try:
        download(repo_id=repo, repo_type="dataset", local_dir=str(folder), token=env.get("HF_TOKEN") or None)
        if (folder / MANIFEST).is_file():
            state.restored = restore_snapshot(folder, config.data_dir())
        else:
            logger.info("%s holds no snapshot yet: starting empty", repo)
    except RepositoryNotFoundError:
        logger.info("%s does not exist yet: starting empty; the first upload creates it", repo)
    except Exception as exc:
        logger.exception("restoring from %s failed", repo)
        state.error = f"restore failed: {_one_line(exc)}"
    return state


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__

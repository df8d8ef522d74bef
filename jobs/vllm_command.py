"""`python -m jobs.vllm_command`: the vLLM command that serves a base model with this app's LoRA
adapters, so evaluations too large for one process run on a GPU server (multi-LoRA: every adapter
is a served model name, and the app uses each as a system of kind openai).

    vllm serve MODEL --served-model-name REF --enable-lora --lora-modules a=/abs/a b=/abs/b \\
        --max-lora-rank 16 --max-loras 2

Only adapters trained on (or imported for) the same base model are served; their names pass the
app's name rule, and --max-lora-rank is the smallest rank vLLM accepts that holds every adapter's.
With --start, and vLLM installed, the command replaces this process.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from core.model_files import AdapterError, adapter_folder
from core.names import check_name
from core.schema import InputError

# vLLM's LoRAConfig.max_lora_rank is one of these (vllm/config/lora.py, MaxLoRARanks).
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


@dataclass(frozen=True)
class ServedAdapter:
    name: str
    folder: Path  # absolute
    rank: int


def lora_rank(folder: Path) -> int:
    """The largest LoRA rank in the folder's adapter_config.json (r, and any rank_pattern)."""
    config_file = folder / "adapter_config.json"
    if not config_file.is_file():
        raise AdapterError(f"'{folder}' is not a LoRA adapter folder (no adapter_config.json).")
    data = json.loads(config_file.read_text(encoding="utf-8"))
    ranks = [data.get("r"), *(data.get("rank_pattern") or {}).values()]
    ranks = [r for r in ranks if isinstance(r, int) and r > 0]
    if not ranks:
        raise AdapterError(f"The adapter config in '{folder}' names no LoRA rank (r).")
    return max(ranks)


def vllm_max_rank(ranks: Iterable[int]) -> int:
    """The smallest --max-lora-rank vLLM accepts that is at least every rank."""
    top = max(ranks, default=1)
    fitting = [r for r in VLLM_LORA_RANKS if r >= top]
    if not fitting:
        raise AdapterError(f"LoRA rank {top} is above the largest vLLM serves ({VLLM_LORA_RANKS[-1]}).")
    return fitting[0]


def same_model(a: str, b: str) -> bool:
    """Two model refs name the same model: equal as written, or the same local folder."""
    a, b = a.strip(), b.strip()
    if a == b:
        return True
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    return pa.is_dir() and pb.is_dir() and pa.resolve() == pb.resolve()


def pick_adapters(rows: list[dict[str, Any]], base: str, wanted: list[str] | None) -> list[dict[str, Any]]:
    """The adapter rows to serve on `base`: the named ones (each must exist and belong to `base`),
    or with `wanted` None every adapter of `base`, in name order."""
    by_name = {row["name"]: row for row in rows}
    if wanted is None:
        chosen = [by_name[n] for n in sorted(by_name) if same_model(by_name[n]["base_model"], base)]
        if not chosen:
            raise InputError(f"No adapter of base model '{base}' here: train or import one first.")
        return chosen
    chosen = []
    for name in dict.fromkeys(wanted):
        check_name(name, "Adapter name", AdapterError)
        row = by_name.get(name)
        if row is None:
            raise AdapterError(f"No adapter named '{name}' (known: {', '.join(sorted(by_name)) or 'none'}).")
        if not same_model(row["base_model"], base):
            raise AdapterError(f"Adapter '{name}' belongs to base model '{row['base_model']}', "
                               f"not '{base}'.")
        chosen.append(row)
    return chosen


def served_adapter(row: dict[str, Any]) -> ServedAdapter:
    """A stored adapter as vLLM loads it: its folder (an adapter imported from the Hub: the
    downloaded snapshot) and its rank; the name checked against the app's name rule."""
    name = check_name(row["name"], "Adapter name", AdapterError)
    folder = Path(row["path"]).expanduser()
    folder = folder.resolve() if folder.is_dir() else adapter_folder(row["path"]).resolve()
    return ServedAdapter(name, folder, lora_rank(folder))


def lora_module(adapter: ServedAdapter) -> str:
    """vLLM's --lora-modules item: name=path, or its JSON form where the path holds '=' or ','
    (vLLM splits name=path on '=' and reads an item with a ',' as JSON)."""
    path = str(adapter.folder)
    if "=" in path or "," in path:
        return json.dumps({"name": adapter.name, "path": path})
    return f"{adapter.name}={path}"


def vllm_command(model: str, served_name: str, adapters: list[ServedAdapter],
                 host: str | None = None, port: int | None = None) -> list[str]:
    """argv of `vllm serve`: `model` (a folder or Hub id) served as `served_name` (the app's ref,
    so the server's model list names it as the app does), with every adapter by its name."""
    if not adapters:
        raise InputError("Name at least one adapter to serve.")
    argv = ["vllm", "serve", model]
    if served_name != model:
        argv += ["--served-model-name", served_name]
    argv += ["--enable-lora", "--lora-modules", *(lora_module(a) for a in adapters),
             "--max-lora-rank", str(vllm_max_rank(a.rank for a in adapters)),
             "--max-loras", str(len(adapters))]
    if host:
        argv += ["--host", host]
    if port:
        argv += ["--port", str(port)]
    return argv


def adapter_rows() -> tuple[list[dict[str, Any]], str | None]:
    """Every adapter row the app knows, and a note when only the trained folders could be read
    (the running app holds the database)."""
    from core.store import Store, StoreLockedError
    from jobs.adapters import trained_here

    try:
        store = Store()
    except StoreLockedError:
        return trained_here(), ("note: the app holds the database, so only adapters trained here "
                                "are listed; stop it to include imported ones")
    try:
        return [row.to_dict() for row in store.list_adapters()], None
    finally:
        store.close()


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m jobs.vllm_command",
        description="Print (or start) the vLLM command that serves a base model with this app's "
                    "LoRA adapters (--enable-lora). Add the server to the app as an "
                    "OpenAI-compatible endpoint (base URL http://HOST:PORT/v1), then 'List "
                    "server models' in the Compare or Evaluate tab: each adapter is a system.")
    p.add_argument("--base", required=True, help="the base model as the app names it (alias, "
                   "folder or Hub id), as its adapters record it")
    p.add_argument("--adapters", default="all",
                   help="comma-separated adapter names, or 'all' (every adapter of --base; default)")
    p.add_argument("--host", help="vLLM's --host (default: vLLM's)")
    p.add_argument("--port", type=int, help="vLLM's --port (default: vLLM's, 8000)")
    p.add_argument("--start", action="store_true", help="run the command (needs vllm installed)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from core.model_files import model_path

    wanted = None if args.adapters.strip() == "all" else [
        n.strip() for n in args.adapters.split(",") if n.strip()]
    try:
        rows, note = adapter_rows()
        adapters = [served_adapter(row) for row in pick_adapters(rows, args.base, wanted)]
        # The weights the adapters were trained on: for the built-in alias, its converted folder.
        command = vllm_command(model_path(args.base), args.base.strip(), adapters, args.host, args.port)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if note:
        print(note, file=sys.stderr)
    print(shlex.join(command), flush=True)
    if not args.start:
        return 0
    if shutil.which("vllm") is None:
        print("error: vllm is not installed here (pip install vllm, on a machine with a GPU); "
              "run the command above where it is.", file=sys.stderr)
        return 2
    os.execvp(command[0], command)
    return 0  # not reached: the process is now vLLM's


if __name__ == "__main__":
    sys.exit(main())

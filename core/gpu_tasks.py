"""The model work that ZeroGPU runs on a GPU (core.gpu): on ZeroGPU each call runs in a forked
worker that holds a GPU for it, so these take and return only picklable values and find the model
in the process-wide hub (core.models.get_hub). The model is loaded in this process first, so that
a worker inherits it instead of loading it again; what a worker caches (a prefix, an adapter
attached there) dies with it. Elsewhere they are plain calls."""
from __future__ import annotations

from core.generation import Generation, GenParams, Prompt
from core.gpu import gpu_task
from core.models import get_hub
from core.scoring import TokenScores
from core.systems import BASE


@gpu_task()
def _generate_on_gpu(model_ref: str, prompts: list[Prompt], adapters: list[str],
                     params: GenParams, shared: str) -> list[Generation]:
    return get_hub().generate(model_ref, prompts, adapters, params, shared=shared)


@gpu_task()
def _score_on_gpu(model_ref: str, prompts: list[Prompt], candidates: list[str], adapter: str,
                  assistant_prefix: str, shared: str) -> list[TokenScores]:
    return get_hub().score_tokens_batch(model_ref, prompts, candidates, adapter, assistant_prefix, shared)


def generate_task(model_ref: str, prompts: list[Prompt], adapters: list[str], params: GenParams,
                  shared: str = "") -> list[Generation]:
    """ModelHub.generate on the process-wide hub, as one GPU task (no cancel: an Event does not
    cross into a ZeroGPU worker)."""
    get_hub().load(model_ref)
    return _generate_on_gpu(model_ref, prompts, adapters, params, shared)


def score_task(model_ref: str, prompts: list[Prompt], candidates: list[str], adapter: str = BASE,
               assistant_prefix: str = "", shared: str = "") -> list[TokenScores]:
    """ModelHub.score_tokens_batch on the process-wide hub, as one GPU task."""
    get_hub().load(model_ref)
    return _score_on_gpu(model_ref, prompts, candidates, adapter, assistant_prefix, shared)

"""ZeroGPU: `gpu_task` is `spaces.GPU` on a ZeroGPU Space and does nothing anywhere else.

On ZeroGPU (a Hugging Face Space whose hardware is "ZeroGPU"; the platform sets
SPACES_ZERO_GPU=true and the `spaces` package reads it into `spaces.config.Config.zero_gpu`) a
GPU exists only inside functions decorated with `spaces.GPU`, which run in a forked worker: their
arguments and results are pickled, and whatever they change in memory (a model loaded, an adapter
attached, a prefix cached) stays in the worker. So only pure entry points take the decorator:
picklable arguments (names, prompts, parameters) in, picklable results (texts, scores) out, the
model looked up in the process-wide hub inside (core.gpu_tasks).

Elsewhere (no `spaces` package, as in requirements.txt; or `spaces` installed off ZeroGPU) the
decorated function is the function itself. README, "GPUs", says which versions ZeroGPU runs.
"""
from __future__ import annotations

import importlib
import logging
import os
from typing import Callable, TypeVar

logger = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable)

# Seconds a task may hold the GPU (spaces.GPU's duration; the platform refuses very long ones).
DEFAULT_SECONDS = 60


def zero_gpu() -> bool:
    """Whether this process runs on ZeroGPU: the `spaces` package imports and its config says so."""
    try:
        spaces_config = importlib.import_module("spaces.config")
    except ImportError:
        return False
    return bool(getattr(getattr(spaces_config, "Config", None), "zero_gpu", False))


_fork_guarded = False


def _one_thread_in_forked_worker() -> None:
    """A forked child must not enter an OpenMP parallel region: torch's CPU ops run on libgomp,
    whose thread pool the parent started (model loading, the thread probe) and which does not
    exist in the child, so its first multi-threaded op waits forever on those threads (seen
    here: a ZeroGPU stand-in worker stuck in `cos` under libgomp). One thread runs every op
    inline; a ZeroGPU worker's work is on the GPU anyway."""
    import torch

    torch.set_num_threads(1)


def _guard_forks() -> None:
    global _fork_guarded
    if not _fork_guarded:
        os.register_at_fork(after_in_child=_one_thread_in_forked_worker)
        _fork_guarded = True


def gpu_task(duration: int = DEFAULT_SECONDS) -> Callable[[F], F]:
    """`spaces.GPU(duration=...)` on ZeroGPU, decided when the function is decorated; else the
    function unchanged. On ZeroGPU, forked workers run torch on one CPU thread."""
    def decorate(fn: F) -> F:
        if not zero_gpu():
            return fn
        import spaces

        _guard_forks()
        logger.info("ZeroGPU: %s runs as a GPU task (up to %d s)", fn.__qualname__, duration)
        return spaces.GPU(duration=duration)(fn)
    return decorate

"""torch's thread count, chosen once per process: TORCH_THREADS when set, else a quick probe.

On a busy 2-core machine one thread can decode several times faster than two (the second thread
waits at every operation's barrier for a core someone else holds), and on an idle one two win.
The probe times a small decode-like forward (a stack of small matmuls, as a 135M model's decode
step does) at 1 thread and at the default count, and keeps the faster; it costs well under 0.5 s.
"""
from __future__ import annotations

import logging
import threading
import time

import torch

from core import config

logger = logging.getLogger(__name__)

_CHOSEN: int | None = None
_LOCK = threading.Lock()
PROBE_BUDGET_S = 0.4


def _forward_seconds(weights: list[tuple[torch.Tensor, torch.Tensor]], x: torch.Tensor) -> float:
    start = time.perf_counter()
    with torch.inference_mode():
        for w1, w2 in weights:
            x = torch.relu(x @ w1) @ w2
    return time.perf_counter() - start


def probe_threads(budget_s: float = PROBE_BUDGET_S) -> int:
    """The thread count (1 or torch's default) whose decode-like forward ran faster, the best of
    alternating trials within about `budget_s`. Leaves torch's setting as it found it."""
    default = torch.get_num_threads()
    if default <= 1:
        return 1
    generator = torch.Generator().manual_seed(0)
    # 8 layers of a 576-wide model with a 1536 MLP (SmolLM2-135M's shapes), 4 rows: ~14 MB.
    weights = [(torch.randn(576, 1536, generator=generator), torch.randn(1536, 576, generator=generator))
               for _ in range(8)]
    x = torch.randn(4, 576, generator=generator)
    best = {1: float("inf"), default: float("inf")}
    deadline = time.perf_counter() + budget_s
    try:
        for trial in range(20):
            for count in best:
                torch.set_num_threads(count)
                best[count] = min(best[count], _forward_seconds(weights, x))
            if trial >= 2 and time.perf_counter() > deadline:
                break
    finally:
        torch.set_num_threads(default)
    return min(best, key=lambda count: (best[count], count))


def configure_threads(count: int | None = None) -> int:
    """Set torch's thread count once per process and log it: `count` when given (a bench's
    --threads), else TORCH_THREADS, else the probe's pick. Later calls return the same count."""
    global _CHOSEN
    with _LOCK:
        if _CHOSEN is None:
            reason = "given" if count else "TORCH_THREADS"
            chosen = count or config.torch_threads()
            if chosen is None:
                start = time.perf_counter()
                chosen = probe_threads()
                reason = f"probe of 1 vs {torch.get_num_threads()} threads, {time.perf_counter() - start:.2f} s"
            torch.set_num_threads(chosen)
            _CHOSEN = chosen
            logger.info("torch threads: %d (%s)", chosen, reason)
        return _CHOSEN

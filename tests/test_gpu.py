"""ZeroGPU's decorator (core.gpu): a no-op without the `spaces` package (our requirements) and with
it off ZeroGPU; `spaces.GPU` on ZeroGPU. A stand-in `spaces` package in a temporary folder plays
the part (its config reads SPACES_ZERO_GPU, as the real one does), in a fresh interpreter each
time. The integration test runs the decorated judge and generator through a stand-in that does
what ZeroGPU does to a call (a forked worker, arguments and results pickled) on the real model."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from core import gpu

REPO = Path(__file__).resolve().parent.parent

FAKE_CONFIG = """
import os

class Config:
    zero_gpu = os.getenv("SPACES_ZERO_GPU", "").lower() in ("1", "t", "true")
"""
# Like ZeroGPU: the call runs in a forked worker; arguments go in and the result comes out pickled.
FAKE_SPACES = """
import multiprocessing
import pickle

from . import config

CALLS = []


def GPU(duration=60):
    def decorate(fn):
        def run(*args, **kwargs):
            payload = pickle.dumps((args, kwargs))
            ctx = multiprocessing.get_context("fork")
            parent, child = ctx.Pipe()

            def work():
                a, k = pickle.loads(payload)
                child.send_bytes(pickle.dumps(fn(*a, **k)))

            worker = ctx.Process(target=work)
            worker.start()
            result = pickle.loads(parent.recv_bytes())
            worker.join()
            CALLS.append((fn.__name__, duration))
            return result
        run.gpu_duration = duration
        return run
    return decorate
"""


def fake_spaces(root: Path) -> Path:
    (root / "spaces").mkdir(parents=True)
    (root / "spaces" / "__init__.py").write_text(FAKE_SPACES)
    (root / "spaces" / "config.py").write_text(FAKE_CONFIG)
    return root


def run_python(code: str, path: Path | None = None, zero_gpu: bool = False, timeout: float = 120,
               **extra_env: str) -> dict:
    """Run `code` (which prints one JSON line last) in a fresh interpreter from the repo root."""
    env = {k: v for k, v in os.environ.items() if k != "SPACES_ZERO_GPU"} | extra_env
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(path) if path else "", str(REPO)) if p)
    if zero_gpu:
        env["SPACES_ZERO_GPU"] = "true"
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


DECIDE = """
import json
from core import gpu

def f(x):
    return x + 1

g = gpu.gpu_task(duration=30)(f)
print(json.dumps({"zero_gpu": gpu.zero_gpu(), "same": g is f, "duration": getattr(g, "gpu_duration", None),
                  "value": g(1)}))
"""


def test_without_the_spaces_package_the_decorator_changes_nothing():
    with pytest.raises(ImportError):
        __import__("spaces")  # requirements.txt does not install it
    assert gpu.zero_gpu() is False
    assert run_python(DECIDE, zero_gpu=True) == {"zero_gpu": False, "same": True, "duration": None, "value": 2}


def test_with_spaces_off_zero_gpu_the_decorator_changes_nothing(tmp_path):
    path = fake_spaces(tmp_path)
    assert run_python(DECIDE, path) == {"zero_gpu": False, "same": True, "duration": None, "value": 2}


def test_on_zero_gpu_the_decorator_is_spaces_gpu(tmp_path):
    path = fake_spaces(tmp_path)
    assert run_python(DECIDE, path, zero_gpu=True) == {"zero_gpu": True, "same": False, "duration": 30,
                                                       "value": 2}


JUDGE_AND_GENERATE = """
import json
import spaces
import torch
from core import gpu
from core.generation import GenParams
from core.judges import LocalJudge
from core.model_files import SMOLLM2
from core.models import get_hub
from pipelines.components import LocalChatGenerator
from haystack.dataclasses import ChatMessage

judge = LocalJudge(SMOLLM2)
prompts = [[{"role": "user", "content": "Rate from 1 to 5 how correct this is: Paris is in France."}],
           [{"role": "user", "content": "Rate from 1 to 5 how correct this is: the sun is cold."}]]
scores = dict(judge.score_slots(prompts, ["1", "2", "3", "4", "5"], "Score:"))
texts = judge.complete(prompts, max_new_tokens=6)
reply = LocalChatGenerator(SMOLLM2, {"max_new_tokens": 6}).run(
    [ChatMessage.from_user("When was the Eiffel Tower completed?")])["replies"][0].text
calls = [name for name, _ in spaces.CALLS]
print(json.dumps({"scores": {i: s.probs for i, s in scores.items()}, "texts": texts, "reply": reply,
                  "calls": calls, "merging": get_hub()._batch_window_s > 0,
                  "threads": torch.get_num_threads(),
                  "task_threads": gpu.gpu_task()(torch.get_num_threads)()}))
"""


@pytest.mark.integration
def test_the_decorated_judge_and_generator_answer_the_same_through_a_zero_gpu_worker(tmp_path):
    path = fake_spaces(tmp_path)
    # Two threads in the parent, so that its OpenMP pool exists when the worker forks.
    plain = run_python(JUDGE_AND_GENERATE, path, timeout=300, TORCH_THREADS="2")
    forked = run_python(JUDGE_AND_GENERATE, path, zero_gpu=True, timeout=300, TORCH_THREADS="2")
    assert plain["calls"] == [] and plain["merging"]
    assert not forked["merging"]  # a forked worker must not wait on the main process's merger
    assert sorted(set(forked["calls"])) == ["_generate_on_gpu", "_score_on_gpu"]
    # A forked worker runs torch on one thread (an OpenMP pool the parent started would hang it);
    # the parent keeps its own count, and off ZeroGPU nothing changes.
    assert forked["threads"] == plain["threads"] == plain["task_threads"] == 2
    assert forked["task_threads"] == 1
    assert forked["texts"] == plain["texts"] and forked["reply"] == plain["reply"]
    for i, probs in plain["scores"].items():
        assert forked["scores"][i] == pytest.approx(probs, abs=1e-6)

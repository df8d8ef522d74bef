"""Real things tests need beside the app: random-init LoRA adapters and an OpenAI-compatible
server (`transformers serve` on the converted 135M model, on a free loopback port)."""
from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

from core.model_files import SMOLLM2, model_path


def free_port() -> int:
    """A loopback port nothing listens on (also usable as a 'closed' port for error tests)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_lora_adapters(root: Path, names: list[str], hidden_override: dict | None = None,
                       target_modules: tuple[str, ...] = ("q_proj", "v_proj")) -> dict[str, Path]:
    """Real LoRA folders with random (init_lora_weights=False) weights, so they change answers."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig

    if hidden_override:
        base = AutoModelForCausalLM.from_config(LlamaConfig(**hidden_override))
    else:
        base = AutoModelForCausalLM.from_pretrained(model_path(SMOLLM2), dtype=torch.float32)
    folders = {}
    for seed, name in enumerate(names):
        torch.manual_seed(1000 + seed)
        peft_model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16,
                                                     target_modules=list(target_modules),
                                                     init_lora_weights=False))
        folders[name] = root / name
        peft_model.save_pretrained(folders[name])
        base = peft_model.unload()
    return folders


@contextmanager
def served_model(timeout: float = 180, port: int | None = None) -> Iterator[tuple[str, str]]:
    """Yields (base_url ending in /v1, served model name). `port` lets a test bring a server up
    where a job once found none (a failed run that resumes)."""
    port = port or free_port()
    folder = model_path(SMOLLM2)
    cli = Path(sys.executable).parent / "transformers"
    server = subprocess.Popen([str(cli), "serve", folder, "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("transformers serve did not start")
                time.sleep(1)
        yield f"http://127.0.0.1:{port}/v1", folder
    finally:
        server.terminate()
        server.wait(timeout=30)

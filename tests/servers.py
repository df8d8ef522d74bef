"""Real things tests need beside the app: random-init LoRA adapters, an OpenAI-compatible
server (`transformers serve` on the converted 135M model, on a free loopback port), and a small
OpenAI-compatible HTTP server that records the key each request carries."""
from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import urllib.request
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator

import torch

from core.model_files import SMOLLM2, model_path
from tests.app_server import free_port


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


class KeyRecordingServer(ThreadingHTTPServer):
    """/v1/chat/completions answering `reply` to everything (streamed or not, with logprobs when
    asked), recording each request's Authorization header in `auth` and the model it named in
    `asked`. With `key`, a request carrying another key gets 401, as a hosted endpoint answers.

    GET /v1/models lists `models` as vLLM does: ModelCards, a LoRA adapter's with `parent` set to
    its base model (vllm/entrypoints/openai/serving_models.py, show_available_models)."""

    daemon_threads = True

    def __init__(self, reply: str = "3", key: str | None = None,
                 models: dict[str, str | None] | None = None) -> None:
        """`models`: served name -> parent (None for a base model)."""
        super().__init__(("127.0.0.1", 0), _ChatHandler)
        self.reply, self.key = reply, key
        self.models = models or {"m": None}
        self.auth: list[str] = []
        self.asked: list[str] = []
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"

    def record(self, header: str, model: str | None = None) -> None:
        with self._lock:
            self.auth.append(header)
            if model is not None:
                self.asked.append(model)


class _ChatHandler(BaseHTTPRequestHandler):
    server: KeyRecordingServer

    def log_message(self, *args) -> None:  # quiet test output
        pass

    def do_GET(self) -> None:
        if self.path.rstrip("/") != "/v1/models":
            return self._json(404, {"error": {"message": f"no route {self.path}"}})
        if self._refused():
            return
        cards = [{"id": name, "object": "model", "created": 0, "owned_by": "vllm",
                  "root": f"/models/{name}", "parent": parent, "max_model_len": 2048,
                  "permission": []} for name, parent in self.server.models.items()]
        self._json(200, {"object": "list", "data": cards})

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        if self._refused(body.get("model", "m")):
            return
        reply, model = self.server.reply, body.get("model", "m")
        usage = {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}
        if body.get("stream"):
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            chunks = [{"choices": [{"index": 0, "delta": {"role": "assistant", "content": reply},
                                    "finish_reason": None}]},
                      {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
                      {"choices": [], "usage": usage}]
            for chunk in chunks:
                event = {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": model, **chunk}
                self.wfile.write(f"data: {json.dumps(event)}\n\n".encode())
            self.wfile.write(b"data: [DONE]\n\n")
            return
        top = [{"token": reply, "logprob": 0.0, "bytes": None}]
        logprobs = {"content": [{**top[0], "top_logprobs": top}]} if body.get("logprobs") else None
        self._json(200, {"id": "c", "object": "chat.completion", "created": 0, "model": model,
                         "choices": [{"index": 0, "message": {"role": "assistant", "content": reply},
                                      "logprobs": logprobs, "finish_reason": "stop"}],
                         "usage": usage})

    def _refused(self, model: str | None = None) -> bool:
        """Record the request; answer 401 (and say so) when it carries the wrong key."""
        auth = self.headers.get("Authorization", "")
        self.server.record(auth, model)
        if self.server.key is not None and auth != f"Bearer {self.server.key}":
            self._json(401, {"error": {"message": "Incorrect API key provided.",
                                       "type": "invalid_request_error", "code": "invalid_api_key"}})
            return True
        return False

    def _json(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@contextmanager
def key_recording_server(reply: str = "3", key: str | None = None,
                         models: dict[str, str | None] | None = None) -> Iterator[KeyRecordingServer]:
    server = KeyRecordingServer(reply, key, models)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()

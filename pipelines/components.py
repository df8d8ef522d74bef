"""Our Haystack components and the factories that turn spec model names into Haystack components.

LocalChatGenerator answers through core.models' ModelHub, so a pipeline's generator shares the one
loaded copy of the model (and its LoRA adapters) with the compare and evaluate flows.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from haystack import Pipeline, component, default_from_dict, default_to_dict
from haystack.core.serialization import allow_deserialization_module
from haystack.dataclasses import ChatMessage
from haystack.utils import Secret as HaystackSecret

from core import config
from core.generation import GenParams
from core.model_files import ModelNotFoundError, UnsupportedModelError, load_path, resolve
from core.gpu_tasks import generate_task
from core.models import get_hub
from core.secrets import OPERATOR_KEY_ENV, Secret, api_key_for, is_operator_endpoint
from core.systems import BASE
from pipelines.spec import GeneratorSpec, SpecError

_GEN_PARAMS = ("max_new_tokens", "temperature", "top_p", "seed")
_CHAT_ROLES = ("system", "user", "assistant")
# Local OpenAI-compatible servers (vLLM, transformers serve, Ollama) accept any key but the client
# refuses to start without one; this stand-in is not a secret.
LOCAL_SERVER_KEY = "no-key-needed"

# Haystack 3 refuses to load YAML that names a class from a module off its allowlist; ours is trusted
# code, so pipelines this app saved load back once this module is imported.
allow_deserialization_module(__name__)


@component
class LocalChatGenerator:
    """A chat generator over the process-wide ModelHub.

    `adapter` is a run input, not an init parameter, so one pipeline serves the base model
    ("__base__") and every fine-tuned adapter attached to the hub (ModelHub.load_adapter).
    """

    def __init__(self, model: str = config.DEFAULT_CHAT_MODEL, generation_kwargs: dict[str, Any] | None = None):
        self.model = model
        self.generation_kwargs = dict(generation_kwargs or {})
        _gen_params(self.generation_kwargs)  # fail at build time on a bad key, not at the first question

    def warm_up(self) -> None:
        get_hub().load(self.model)

    @component.output_types(replies=list[ChatMessage])
    def run(self, messages: list[ChatMessage], adapter: str = BASE,
            generation_kwargs: dict[str, Any] | None = None) -> dict[str, list[ChatMessage]]:
        params = _gen_params({**self.generation_kwargs, **(generation_kwargs or {})})
        generation = generate_task(self.model, [chat_dicts(messages)], [adapter], params)[0]
        meta = {"model": self.model, "adapter": adapter, "new_tokens": generation.new_tokens,
                "prompt_tokens": generation.prompt_tokens, "seconds": generation.seconds}
        return {"replies": [ChatMessage.from_assistant(generation.text, meta=meta)]}

    def to_dict(self) -> dict[str, Any]:
        return default_to_dict(self, model=self.model, generation_kwargs=self.generation_kwargs)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LocalChatGenerator":
        return default_from_dict(cls, data)


def _gen_params(kwargs: dict[str, Any]) -> GenParams:
    unknown = sorted(set(kwargs) - set(_GEN_PARAMS))
    if unknown:
        raise SpecError(f"Unknown generation setting(s) {', '.join(unknown)}; "
                        f"the local generator takes: {', '.join(_GEN_PARAMS)}.")
    try:
        return GenParams(**kwargs)
    except (TypeError, ValueError) as exc:
        raise SpecError(f"Bad generation settings {kwargs}: {exc}") from exc


def chat_dicts(messages: list[ChatMessage]) -> list[dict[str, str]]:
    """Haystack ChatMessages as the role/content dicts that ModelHub and OpenAI clients take."""
    out = []
    for message in messages:
        role = message.role.value
        if role not in _CHAT_ROLES or message.text is None:
            raise SpecError(f"A prompt message has role '{role}' or no text; only system, user and "
                            "assistant text messages can be sent to the model.")
        out.append({"role": role, "content": message.text})
    return out


def make_generator(spec: GeneratorSpec, api_key: Secret | None = None) -> Any:
    """The Haystack chat generator a GeneratorSpec describes (not warmed up). `api_key`: the
    key a visitor typed; without one, the operator's OPENAI_API_KEY serves the operator's endpoint
    only, and another base URL gets a stand-in (local servers check no key)."""
    if spec.kind == "local":
        return LocalChatGenerator(spec.model, {"max_new_tokens": spec.max_new_tokens,
                                               "temperature": spec.temperature})
    from haystack.components.generators.chat import OpenAIChatGenerator

    if api_key is not None:
        key = HaystackSecret.from_token(api_key.reveal())  # Haystack refuses to serialise it
    elif is_operator_endpoint(spec.base_url):
        if api_key_for(spec.base_url, None) is None:
            raise SpecError(f"The OpenAI generator needs an API key: set the {OPERATOR_KEY_ENV} "
                            "environment variable, or give the base URL of a local server.")
        key = HaystackSecret.from_env_var(OPERATOR_KEY_ENV)  # serialised as the variable's name
    else:
        key = HaystackSecret.from_token(LOCAL_SERVER_KEY)
    return OpenAIChatGenerator(api_key=key, model=spec.model, api_base_url=spec.base_url,
                               generation_kwargs={"max_completion_tokens": spec.max_new_tokens,
                                                  "temperature": spec.temperature})


# ---------------------------------------------------------------- embedders and rankers


def embedder_path(ref: str) -> str:
    """What SentenceTransformers loads for an embedder name: a folder, or a hub id."""
    try:
        resolved = resolve(ref)
        if resolved.source is not None:  # the converted-GGUF alias is a chat model
            raise SpecError(f"'{ref}' is a chat model, not a sentence-transformers embedder; "
                            f"try '{config.DEFAULT_EMBEDDER}'.")
        return load_path(resolved)
    except ModelNotFoundError as exc:
        raise SpecError(f"Embedder: {exc}") from exc


def make_ranker(ref: str, top_k: int) -> Any:
    """A cross-encoder ranker. A local folder must hold a sequence-classification model: a plain
    bi-encoder would load with a random scoring head and rank silently at random."""
    from haystack_integrations.components.rankers.sentence_transformers import (
        SentenceTransformersSimilarityRanker,
    )

    path = embedder_path(ref)
    if Path(path).is_dir():
        architectures = _architectures(Path(path))
        if not any(a.endswith("ForSequenceClassification") for a in architectures):
            raise SpecError(f"Ranker '{ref}' is not a cross-encoder (its model is "
                            f"{', '.join(architectures) or 'of unknown type'}); choose a "
                            "sentence-transformers cross-encoder, or no ranker.")
    return SentenceTransformersSimilarityRanker(model=path, top_k=top_k)


def _architectures(folder: Path) -> list[str]:
    try:
        return list(json.loads((folder / "config.json").read_text()).get("architectures") or [])
    except (OSError, json.JSONDecodeError):
        return []


def warm_up(pipeline: Pipeline) -> None:
    """Load every model the pipeline needs, naming the component whose model is missing."""
    for name, instance in pipeline.walk():
        if not hasattr(instance, "warm_up"):
            continue
        try:
            instance.warm_up()
        except SpecError:
            raise
        except (ModelNotFoundError, UnsupportedModelError) as exc:  # already a sentence for the user
            raise SpecError(str(exc)) from exc
        except (OSError, ValueError, RuntimeError) as exc:
            model = getattr(instance, "model", "")
            raise SpecError(f"The {name} model '{model}' could not be loaded: it is not a local "
                            f"folder we can read, and the Hugging Face Hub is unreachable or does "
                            f"not have it ({type(exc).__name__}).") from exc

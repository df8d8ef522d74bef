"""PipelineSpec: everything that defines a RAG pipeline, as plain JSON, plus save/load/list/delete.

Specs live as files under config.subdir("pipelines") (one `<name>.json`, and `<name>.yaml` with the
Haystack YAML when the caller has it), so jobs running in a subprocess can read them while the app
holds the DuckDB file; `save_spec(..., store=...)` also records the row in the `pipelines` table.
A built index lives in config.subdir("indexes")/<name>/ (see pipelines.indexing).
"""
from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, get_args

from pydantic import AfterValidator, BeforeValidator, Field, field_validator, model_validator

from core import config
from core.names import check_name, inside
from core.schema import InputError
from core.specs import Number, PipelineName, Spec, Text, WholeNumber

if TYPE_CHECKING:
    from core.store import Store

SplitBy = Literal["word", "sentence", "passage"]
RetrieverKind = Literal["bm25", "embedding", "hybrid"]
GeneratorKind = Literal["local", "openai"]
SPLIT_BY = get_args(SplitBy)  # the choices the RAG tab offers
RETRIEVERS = get_args(RetrieverKind)

MAX_TOP_K = 100
logger = logging.getLogger(__name__)

# A ChatPromptBuilder string template. Small models follow a short, explicit instruction best, and
# numbered passages let a reader check which one an answer came from.
DEFAULT_TEMPLATE = """{% message role="system" %}
You answer questions using the context passages you are given. Answer concisely: a few words or \
one sentence. If the context does not contain the answer, say that you don't know.
{% endmessage %}
{% message role="user" %}
Context:
{% for document in documents %}
[{{ loop.index }}] {% if document.meta.title %}{{ document.meta.title }}: {% endif %}{{ document.content }}
{% endfor %}
Question: {{ question }}
{% endmessage %}"""


class SpecError(InputError):
    """A pipeline spec, or a model it names, that cannot work; the message says what to change."""


class SplitterSpec(Spec):
    noun = "splitter"
    error = SpecError

    # "sentence" splits after each period (Haystack's split_by="period"): Haystack's own
    # "sentence" mode needs NLTK and its punkt data, which cannot be downloaded offline.
    split_by: SplitBy = Field("word", description="unit the documents are split into")
    split_length: WholeNumber = Field(150, ge=1, description="units per chunk")
    split_overlap: WholeNumber = Field(30, ge=0, description="units shared by neighbouring chunks")

    @model_validator(mode="after")
    def _overlap_below_length(self) -> "SplitterSpec":
        if self.split_overlap >= self.split_length:
            raise SpecError(f"The split overlap must be a whole number from 0 to below the split length "
                            f"({self.split_length}), not {self.split_overlap!r}.")
        return self


class GeneratorSpec(Spec):
    """Which model answers. No key is part of it: the operator's OPENAI_API_KEY serves only the
    operator's endpoint, any other base URL gets the key its visitor typed (core.secrets)."""

    noun = "generator"
    error = SpecError

    kind: GeneratorKind = Field("local", description="local (ModelHub) or openai (any "
                                "OpenAI-compatible endpoint)")
    model: Text = Field(config.DEFAULT_CHAT_MODEL, description="model alias, local folder, hub id, "
                        "or the endpoint's model name")
    base_url: str | None = Field(None, description="OpenAI-compatible server (vLLM, TGI, Ollama, "
                                 "transformers serve), e.g. http://127.0.0.1:8000/v1")
    max_new_tokens: WholeNumber = Field(128, ge=1, le=8192, description="answer length limit in tokens")
    temperature: Number = Field(0.0, ge=0, le=2, description="0 is greedy decoding")

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, url: str | None) -> str | None:
        if url and not re.match(r"^https?://\S+$", url):
            raise SpecError(f"The base URL '{url}' must start with http:// or https://.")
        return url

    @model_validator(mode="before")
    @classmethod
    def _drop_api_key_env(cls, data: Any) -> Any:
        # Specs saved before keys left the spec named an env variable to send as the bearer
        # token; such a spec still loads, and the field is ignored.
        if isinstance(data, dict) and "api_key_env" in data:
            logger.info("Ignoring api_key_env=%r in a stored generator spec: keys are no longer "
                        "named by specs.", data["api_key_env"])
            data = {k: v for k, v in data.items() if k != "api_key_env"}
        return data


def _blank_is_none(value: Any) -> Any:
    return None if isinstance(value, str) and not value.strip() else value


def _renderable(template: str) -> str:
    check_template(template)
    return template


class PipelineSpec(Spec):
    noun = "pipeline spec"
    error = SpecError

    name: PipelineName = Field(description="the pipeline's name (its files and index "
                                           "are named after it)")
    splitter: SplitterSpec = Field(default_factory=SplitterSpec, description="how passages are chunked")
    embedder: Text = Field(config.DEFAULT_EMBEDDER, description="embedding model: alias, local folder "
                           "or hub id")
    retriever: RetrieverKind = Field("hybrid", description="bm25, embedding, or both joined")
    top_k: WholeNumber = Field(3, ge=1, le=MAX_TOP_K, description="passages the prompt receives")
    # A blank ranker box in a form means "no ranker".
    ranker: Annotated[str | None, BeforeValidator(_blank_is_none)] = Field(
        None, description="sentence-transformers cross-encoder that reorders the retrieved passages")
    prompt_template: Annotated[str, AfterValidator(_renderable)] = Field(
        DEFAULT_TEMPLATE, description="ChatPromptBuilder template using {{ question }} and documents")
    generator: GeneratorSpec = Field(default_factory=GeneratorSpec, description="which model answers")

    @property
    def needs_embeddings(self) -> bool:
        return self.retriever in ("embedding", "hybrid")


def check_template(template: str) -> None:
    """Render the template once with stand-in values, so a broken one fails here, not mid-run."""
    from haystack import Document
    from haystack.components.builders import ChatPromptBuilder

    if not isinstance(template, str) or not template.strip():
        raise SpecError("The prompt template is empty.")
    try:
        builder = ChatPromptBuilder(template=template)
        unknown = sorted(set(builder.variables) - {"question", "documents"})
        if unknown:
            raise SpecError(f"The prompt template uses {', '.join(unknown)}; only 'question' and "
                            "'documents' are filled in.")
        if "question" not in builder.variables:
            raise SpecError("The prompt template never uses {{ question }}, so the model would not see it.")
        messages = builder.run(question="q", documents=[Document(content="c")])["prompt"]
    except SpecError:
        raise
    except Exception as exc:  # jinja syntax errors, a bad role, text outside {% message %} blocks
        raise SpecError(f"The prompt template does not render: {exc}. It must be Jinja text made of "
                        '{% message role="system|user|assistant" %} ... {% endmessage %} blocks.') from exc
    if not messages:
        raise SpecError("The prompt template renders no messages; wrap text in {% message role=\"user\" %} blocks.")


# ---------------------------------------------------------------- saved specs


def specs_dir() -> Path:
    return config.subdir("pipelines")


def index_dir(name: str) -> Path:
    """Where the index built for pipeline `name` lives (not created here)."""
    return inside(config.subdir("indexes"), _checked(name))


def save_spec(spec: PipelineSpec, haystack_yaml: str | None = None, store: Store | None = None) -> Path:
    """Write (or overwrite) the spec file; also the Haystack YAML and the DuckDB row when given."""
    path = _spec_file(spec.name, ".json")
    _write_atomic(path, json.dumps(spec.to_dict(), indent=2, ensure_ascii=False))
    yaml_path = path.with_suffix(".yaml")
    if haystack_yaml is not None:
        _write_atomic(yaml_path, haystack_yaml)
    if store is not None:
        store.save_pipeline(spec.name, spec.to_dict(), haystack_yaml)
    return path


def load_spec(name: str) -> PipelineSpec:
    path = _spec_file(name, ".json")
    if not path.is_file():
        known = ", ".join(list_specs()) or "none yet"
        raise SpecError(f"No saved pipeline named '{name}' (saved: {known}).")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise SpecError(f"The saved pipeline '{name}' is not valid JSON ({exc.msg}); save it again.") from exc
    return PipelineSpec.from_dict(data)


def list_specs() -> list[str]:
    return sorted(p.stem for p in specs_dir().glob("*.json"))


def delete_spec(name: str, store: Store | None = None) -> None:
    """Remove the spec, its YAML, its index folder and (given a store) its DuckDB row."""
    for suffix in (".json", ".yaml"):
        _spec_file(name, suffix).unlink(missing_ok=True)
    shutil.rmtree(index_dir(name), ignore_errors=True)
    if store is not None:
        store.delete_pipeline(name)


def _checked(name: str) -> str:
    # Names become file names: the name rule and inside() keep "../x" out of the data dir.
    return check_name(name, "Pipeline name", SpecError)


def _spec_file(name: str, suffix: str) -> Path:
    return inside(specs_dir(), _checked(name) + suffix)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)

"""PipelineSpec: everything that defines a RAG pipeline, as plain JSON, plus save/load/list/delete.

Specs live as files under config.subdir("pipelines") (one `<name>.json`, and `<name>.yaml` with the
Haystack YAML when the caller has it), so jobs running in a subprocess can read them while the app
holds the DuckDB file; `save_spec(..., store=...)` also records the row in the `pipelines` table.
A built index lives in config.subdir("indexes")/<name>/ (see pipelines.indexing).
"""
from __future__ import annotations

import json
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from core import config
from core.schema import InputError, is_int, unknown_fields

if TYPE_CHECKING:
    from core.store import Store

SplitBy = Literal["word", "sentence", "passage"]
RetrieverKind = Literal["bm25", "embedding", "hybrid"]
GeneratorKind = Literal["local", "openai"]

SPLIT_BY = ("word", "sentence", "passage")
RETRIEVERS = ("bm25", "embedding", "hybrid")
GENERATOR_KINDS = ("local", "openai")
MAX_TOP_K = 100
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

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


@dataclass
class SplitterSpec:
    # "sentence" splits after each period (Haystack's split_by="period"): Haystack's own
    # "sentence" mode needs NLTK and its punkt data, which cannot be downloaded offline.
    split_by: SplitBy = "word"
    split_length: int = 150
    split_overlap: int = 30

    def validate(self) -> None:
        if self.split_by not in SPLIT_BY:
            raise SpecError(f"Unknown split unit '{self.split_by}'; choose one of: {', '.join(SPLIT_BY)}.")
        if not is_int(self.split_length) or self.split_length < 1:
            raise SpecError(f"The split length must be a whole number of at least 1, not {self.split_length!r}.")
        if not is_int(self.split_overlap) or not 0 <= self.split_overlap < self.split_length:
            raise SpecError(f"The split overlap must be a whole number from 0 to below the split length "
                            f"({self.split_length}), not {self.split_overlap!r}.")


@dataclass
class GeneratorSpec:
    """Which model answers. The API key itself is never stored: only the name of its env variable."""

    kind: GeneratorKind = "local"
    model: str = config.DEFAULT_CHAT_MODEL
    base_url: str | None = None  # OpenAI-compatible servers (vLLM, TGI, Ollama, transformers serve)
    api_key_env: str = "OPENAI_API_KEY"
    max_new_tokens: int = 128
    temperature: float = 0.0

    def validate(self) -> None:
        if self.kind not in GENERATOR_KINDS:
            raise SpecError(f"Unknown generator kind '{self.kind}'; choose one of: {', '.join(GENERATOR_KINDS)}.")
        if not isinstance(self.model, str) or not self.model.strip():
            raise SpecError("The generator needs a model name.")
        if self.base_url and not re.match(r"^https?://\S+$", self.base_url):
            raise SpecError(f"The base URL '{self.base_url}' must start with http:// or https://.")
        if not _ENV_NAME.match(self.api_key_env or ""):
            raise SpecError(f"'{self.api_key_env}' is not an environment variable name.")
        if not is_int(self.max_new_tokens) or not 1 <= self.max_new_tokens <= 8192:
            raise SpecError(f"max_new_tokens must be a whole number from 1 to 8192, not {self.max_new_tokens!r}.")
        if not isinstance(self.temperature, (int, float)) or not 0 <= self.temperature <= 2:
            raise SpecError(f"The temperature must be from 0 (greedy) to 2, not {self.temperature!r}.")


@dataclass
class PipelineSpec:
    name: str
    splitter: SplitterSpec = field(default_factory=SplitterSpec)
    embedder: str = config.DEFAULT_EMBEDDER  # alias, local folder or hub id (core.models.resolve)
    retriever: RetrieverKind = "hybrid"
    top_k: int = 3
    ranker: str | None = None  # a sentence-transformers cross-encoder (local folder or hub id)
    prompt_template: str = DEFAULT_TEMPLATE
    generator: GeneratorSpec = field(default_factory=GeneratorSpec)

    def __post_init__(self) -> None:
        if self.ranker is not None and isinstance(self.ranker, str) and not self.ranker.strip():
            self.ranker = None  # a blank ranker box in a form means "no ranker"
        self.validate()

    @property
    def needs_embeddings(self) -> bool:
        return self.retriever in ("embedding", "hybrid")

    def validate(self) -> None:
        """Raise SpecError on the first problem; build functions call it again before use."""
        if not isinstance(self.name, str) or not _NAME.match(self.name):
            raise SpecError(f"Pipeline name {self.name!r} is not allowed: use 1-64 letters, digits, "
                            "'_', '-' or '.', starting with a letter or digit.")
        self.splitter.validate()
        if not isinstance(self.embedder, str) or not self.embedder.strip():
            raise SpecError("The pipeline needs an embedder model name.")
        if self.retriever not in RETRIEVERS:
            raise SpecError(f"Unknown retriever '{self.retriever}'; choose one of: {', '.join(RETRIEVERS)}.")
        if not is_int(self.top_k) or not 1 <= self.top_k <= MAX_TOP_K:
            raise SpecError(f"top_k must be a whole number from 1 to {MAX_TOP_K}, not {self.top_k!r}.")
        if self.ranker is not None and not isinstance(self.ranker, str):
            raise SpecError(f"The ranker must be a model name or empty, not {self.ranker!r}.")
        check_template(self.prompt_template)
        self.generator.validate()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PipelineSpec":
        if not isinstance(data, dict):
            raise SpecError("A pipeline spec must be a JSON object.")
        _check_keys(cls, data, "pipeline spec")
        values = dict(data)
        for key, sub in (("splitter", SplitterSpec), ("generator", GeneratorSpec)):
            if key in values:
                if not isinstance(values[key], dict):
                    raise SpecError(f"The '{key}' part of a pipeline spec must be a JSON object.")
                _check_keys(sub, values[key], key)
                values[key] = sub(**values[key])
        if "name" not in values:
            raise SpecError("A pipeline spec needs a name.")
        return cls(**values)


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


def _check_keys(cls: type, data: dict[str, Any], what: str) -> None:
    unknown = unknown_fields(cls, data)
    if unknown:
        raise SpecError(f"Unknown field(s) in the {what}: {', '.join(unknown)}.")


# ---------------------------------------------------------------- saved specs


def specs_dir() -> Path:
    return config.subdir("pipelines")


def index_dir(name: str) -> Path:
    """Where the index built for pipeline `name` lives (not created here)."""
    _check_name(name)
    return config.subdir("indexes") / name


def save_spec(spec: PipelineSpec, haystack_yaml: str | None = None, store: Store | None = None) -> Path:
    """Write (or overwrite) the spec file; also the Haystack YAML and the DuckDB row when given."""
    spec.validate()
    path = specs_dir() / f"{spec.name}.json"
    _write_atomic(path, json.dumps(spec.to_dict(), indent=2, ensure_ascii=False))
    yaml_path = path.with_suffix(".yaml")
    if haystack_yaml is not None:
        _write_atomic(yaml_path, haystack_yaml)
    if store is not None:
        store.save_pipeline(spec.name, spec.to_dict(), haystack_yaml)
    return path


def load_spec(name: str) -> PipelineSpec:
    _check_name(name)
    path = specs_dir() / f"{name}.json"
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
    _check_name(name)
    for suffix in (".json", ".yaml"):
        (specs_dir() / f"{name}{suffix}").unlink(missing_ok=True)
    shutil.rmtree(index_dir(name), ignore_errors=True)
    if store is not None:
        store.delete_pipeline(name)


def _check_name(name: str) -> None:
    # Names become file names: this check is what keeps "../x" out of the data dir.
    if not isinstance(name, str) or not _NAME.match(name):
        raise SpecError(f"Pipeline name {name!r} is not allowed: use 1-64 letters, digits, '_', '-' "
                        "or '.', starting with a letter or digit.")


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)

"""Uploaded documents (.txt, .md, .pdf, .html) -> corpus passages for indexing."""
from __future__ import annotations

import hashlib
import html.parser
from pathlib import Path

from core import config
from core.schema import InputError, Passage
from core.textfiles import decode_text

TEXT_SUFFIXES = (".txt", ".md")
SUFFIXES = (*TEXT_SUFFIXES, ".pdf", ".html", ".htm")


class _TextOnly(html.parser.HTMLParser):
    """Visible text of an HTML page (scripts and styles dropped)."""

    def __init__(self) -> None:
        super().__init__()
        self.parts: list[str] = []
        self._skip = 0

    def handle_starttag(self, tag: str, attrs) -> None:
        self._skip += tag in ("script", "style")

    def handle_endtag(self, tag: str) -> None:
        self._skip -= tag in ("script", "style") and self._skip > 0

    def handle_data(self, data: str) -> None:
        if not self._skip and data.strip():
            self.parts.append(data.strip())


def _pdf_text(path: Path) -> str:
    from pypdf import PdfReader
    from pypdf.errors import PdfReadError

    try:
        reader = PdfReader(str(path))
        return "\n\n".join(page.extract_text() or "" for page in reader.pages)
    except (PdfReadError, ValueError, OSError) as exc:
        raise InputError(f"{path.name} could not be read as a PDF ({exc}).") from exc


def file_text(path: str | Path) -> str:
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise InputError(f"{path.name}: only {', '.join(SUFFIXES)} files can be indexed.")
    if not path.is_file():
        raise InputError(f"{path.name} was not found (upload it again).")
    size = path.stat().st_size
    if size > config.MAX_UPLOAD_BYTES:
        raise InputError(f"{path.name} is {size / 2**20:.1f} MB; the limit is "
                         f"{config.MAX_UPLOAD_BYTES / 2**20:.0f} MB (MAX_UPLOAD_MB).")
    if suffix == ".pdf":
        text = _pdf_text(path)
    else:
        text = decode_text(path.read_bytes(), path.name, InputError)
        if suffix in (".html", ".htm"):
            parser = _TextOnly()
            parser.feed(text)
            text = "\n\n".join(parser.parts)
    if not text.strip():
        raise InputError(f"{path.name} has no text to index.")
    return text


def passages_from_files(paths: list[str | Path]) -> list[Passage]:
    """One passage per paragraph (blank-line separated); the splitter cuts them further."""
    if not paths:
        raise InputError("Upload at least one .txt, .md, .pdf or .html file.")
    passages = []
    for path in paths:
        name = Path(path).name
        for number, para in enumerate(p.strip() for p in file_text(path).split("\n\n")):
            if para:
                digest = hashlib.sha256(para.encode()).hexdigest()[:12]
                passages.append(Passage(id=f"{name}:{number}:{digest}", text=para, title=name,
                                        meta={"source": name}))
    return passages

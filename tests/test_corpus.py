"""Uploaded documents for a RAG corpus: text, Markdown, HTML and PDF in; clear errors otherwise."""
import pytest

from core import config
from core.schema import InputError
from pipelines.corpus import passages_from_files


def test_text_markdown_and_html_become_paragraph_passages(tmp_path):
    (tmp_path / "a.txt").write_text("First paragraph.\n\nSecond paragraph.")
    (tmp_path / "b.md").write_text("# Title\n\nBody text.")
    (tmp_path / "c.html").write_text("<html><head><style>p{}</style><script>x=1</script></head>"
                                     "<body><p>Visible text</p></body></html>")
    passages = passages_from_files([tmp_path / "a.txt", tmp_path / "b.md", tmp_path / "c.html"])
    texts = [p.text for p in passages]
    assert texts[:2] == ["First paragraph.", "Second paragraph."]
    assert "# Title" in texts and "Body text." in texts
    assert any("Visible text" in t for t in texts) and not any("x=1" in t for t in texts)
    assert len({p.id for p in passages}) == len(passages)
    assert passages[0].title == "a.txt"


def test_pdf_text_is_extracted(tmp_path):
    from pypdf import PdfWriter
    from pypdf.generic import NameObject, DecodedStreamObject, DictionaryObject

    writer = PdfWriter()
    page = writer.add_blank_page(width=300, height=200)
    font = DictionaryObject({NameObject("/Type"): NameObject("/Font"),
                             NameObject("/Subtype"): NameObject("/Type1"),
                             NameObject("/BaseFont"): NameObject("/Helvetica")})
    page[NameObject("/Resources")] = DictionaryObject({NameObject("/Font"): DictionaryObject(
        {NameObject("/F1"): writer._add_object(font)})})
    stream = DecodedStreamObject()
    stream.set_data(b"BT /F1 12 Tf 20 100 Td (The capital of France is Paris.) Tj ET")
    page[NameObject("/Contents")] = writer._add_object(stream)
    path = tmp_path / "doc.pdf"
    with path.open("wb") as fh:
        writer.write(fh)
    assert "capital of France is Paris" in passages_from_files([path])[0].text


@pytest.mark.parametrize("name, content, message", [
    ("bin.txt", b"\x00\x01\x02binary", "binary"),
    ("latin.txt", "caf\u00e9".encode("latin-1"), "not UTF-8"),
    ("empty.md", b"   \n\n", "no text"),
    ("sheet.xlsx", b"PK..", "only .txt"),
    ("broken.pdf", b"%PDF-1.4 not really", "could not be read as a PDF"),
])
def test_bad_uploads_get_clear_messages(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(InputError, match=message):
        passages_from_files([path])


def test_missing_none_and_oversized_files(tmp_path, monkeypatch):
    with pytest.raises(InputError, match="at least one"):
        passages_from_files([])
    with pytest.raises(InputError, match="not found"):
        passages_from_files([tmp_path / "gone.txt"])
    big = tmp_path / "big.txt"
    big.write_text("x" * 2000)
    monkeypatch.setattr(config, "MAX_UPLOAD_BYTES", 1000)
    with pytest.raises(InputError, match="limit"):
        passages_from_files([big])

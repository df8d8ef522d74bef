"""Uploaded text is decoded by its byte-order mark: UTF-8 with or without one, UTF-16 and UTF-32
with one; a BOM-less NUL is a binary file, and bytes the encoding rejects are named by line."""
import codecs

import pytest

from core.datasets import DatasetError, load_upload
from core.schema import InputError
from core.textfiles import decode_text
from pipelines.corpus import passages_from_files

TEXT = "question,answer\nWas ist Öl?,Öl ≠ Wasser\n"


@pytest.mark.parametrize("raw", [
    TEXT.encode("utf-8"),
    codecs.BOM_UTF8 + TEXT.encode("utf-8"),
    TEXT.encode("utf-16"),  # Python writes the platform's BOM first
    codecs.BOM_UTF16_LE + TEXT.encode("utf-16-le"),
    codecs.BOM_UTF16_BE + TEXT.encode("utf-16-be"),
    codecs.BOM_UTF32_LE + TEXT.encode("utf-32-le"),
    codecs.BOM_UTF32_BE + TEXT.encode("utf-32-be"),
], ids=["utf8", "utf8-bom", "utf16", "utf16-le", "utf16-be", "utf32-le", "utf32-be"])
def test_text_is_decoded_by_its_bom(raw):
    assert decode_text(raw, "f.csv", InputError) == TEXT


def test_binary_and_broken_text_are_refused_with_their_reason():
    with pytest.raises(InputError, match=r"^f.csv looks like a binary file, not text\.$"):
        decode_text(b"question\n\x00\x01", "f.csv", InputError)
    with pytest.raises(InputError, match=r"^f.csv is not UTF-16 text \(invalid byte on line 1\)"):
        decode_text(codecs.BOM_UTF16_LE + "ab".encode("utf-16-le") + b"\x00\xd8", "f.csv",
                    InputError)


def test_a_utf16_csv_upload_loads(tmp_path):
    path = tmp_path / "excel.csv"
    path.write_bytes(TEXT.encode("utf-16"))
    ds = load_upload(path)
    assert [(e.question, e.answer) for e in ds.examples] == [("Was ist Öl?", "Öl ≠ Wasser")]


def test_a_utf16_text_file_is_indexed(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_bytes("Die Hauptstadt Frankreichs ist Paris.".encode("utf-16"))
    assert "Hauptstadt Frankreichs ist Paris" in passages_from_files([path])[0].text


def test_a_utf16_upload_that_is_cut_off_names_the_encoding(tmp_path):
    path = tmp_path / "cut.csv"
    path.write_bytes(TEXT.encode("utf-16")[:-1])
    with pytest.raises(DatasetError, match=r"^cut.csv is not UTF-16 text"):
        load_upload(path)

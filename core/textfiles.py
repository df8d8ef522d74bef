"""Turning an uploaded text file's bytes into text: UTF-8 (with or without a BOM), and UTF-16 or
UTF-32 when a byte-order mark says so (Windows editors and spreadsheet exports write those).
Without a BOM, a NUL byte early on means a binary file, and anything else must be UTF-8."""
from __future__ import annotations

import codecs

# Longest marks first: the UTF-32 LE mark begins with the UTF-16 LE one.
BOMS = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"),
        (codecs.BOM_UTF8, "utf-8-sig"), (codecs.BOM_UTF16_LE, "utf-16"),
        (codecs.BOM_UTF16_BE, "utf-16"))


def decode_text(raw: bytes, name: str, error: type[Exception]) -> str:
    """The text of the file `name` (used in messages); `error` (a user-facing exception class)
    for a binary file or bytes that its encoding cannot decode."""
    encoding = next((enc for bom, enc in BOMS if raw.startswith(bom)), None)
    if encoding is None and b"\0" in raw[:8192]:
        raise error(f"{name} looks like a binary file, not text.")
    encoding = encoding or "utf-8"
    try:
        return raw.decode(encoding)  # utf-16/32 and utf-8-sig drop the mark
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        label = "UTF-8" if encoding in ("utf-8", "utf-8-sig") else encoding.upper()
        raise error(f"{name} is not {label} text (invalid byte on line {line}); save it as "
                    "UTF-8 and upload it again.") from exc

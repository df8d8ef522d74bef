"""scripts.gif, the README's animated picture, on synthetic frames (no browser, no model)."""
from __future__ import annotations

import io

import pytest
from PIL import Image, ImageDraw

from scripts import gif


def frame(words: int, width: int = 1200, height: int = 300) -> bytes:
    """A white 'answer grid' with `words` dark blocks, as a screenshot's PNG bytes; the grid grows
    by a line every 10 words, as a textbox does."""
    im = Image.new("RGB", (width, height + 20 * (words // 10)), "white")
    draw = ImageDraw.Draw(im)
    for i in range(words):
        x, y = 20 + (i % 10) * 100, 20 + (i // 10) * 20
        draw.rectangle([x, y, x + 80, y + 12], fill=(40, 40, 60))
    out = io.BytesIO()
    im.save(out, format="PNG")
    return out.getvalue()


def frames_of(path):
    with Image.open(path) as im:
        durations, sizes = [], set()
        for i in range(im.n_frames):
            im.seek(i)
            durations.append(im.info["duration"])
            sizes.add(im.size)
        return durations, sizes


def test_frames_are_deduplicated_scaled_and_the_last_one_is_held(tmp_path):
    shots = [frame(0), frame(0), frame(3), frame(3), frame(9), frame(25)]
    header = frame(2, width=700, height=60)
    out = tmp_path / "a.gif"
    assert gif.assemble(shots, out, header=header) == 4  # the duplicates dropped
    durations, sizes = frames_of(out)
    assert durations == [gif.FRAME_MS] * 3 + [gif.HOLD_MS]
    assert len(sizes) == 1 and next(iter(sizes))[0] == gif.WIDTH


def test_the_empty_space_around_what_any_frame_shows_is_cut_alike():
    blank, small, wide = (Image.open(io.BytesIO(frame(n))) for n in (0, 2, 25))
    cut = gif.trimmed([blank, small, wide], margin=8)
    # Blocks span x 20..1000 and y 20..72 in the fullest frame: that box, 8 px around it.
    assert {im.size for im in cut} == {(1001 + 8 - 12, 73 + 8 - 12)}
    assert gif.trimmed([blank]) == [blank]


def test_a_long_capture_keeps_evenly_spaced_frames_with_first_and_last():
    assert gif.spread(list(range(101)), 5) == [0, 25, 50, 75, 100]
    assert gif.spread([1, 2], 5) == [1, 2]


def test_the_command_line_writes_the_file(tmp_path, capsys):
    paths = []
    for words in (1, 50):
        paths.append(tmp_path / f"{words}.png")
        paths[-1].write_bytes(frame(words, width=800))
    gif.main([str(tmp_path / "b.gif"), *map(str, paths)])
    assert "2 frames" in capsys.readouterr().out
    durations, sizes = frames_of(tmp_path / "b.gif")
    assert len(durations) == 2 and max(sizes)[0] < gif.WIDTH  # narrow: not enlarged
    # --box keeps one part of each frame: the first row of blocks, 8 px around what it shows.
    gif.main([str(tmp_path / "c.gif"), *map(str, paths), "--box", "0", "0", "800", "34"])
    assert frames_of(tmp_path / "c.gif")[1] == {(800 - 12, 34 - 12)}


def test_no_frames_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="no frames"):
        gif.assemble([], tmp_path / "c.gif")

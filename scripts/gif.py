"""An animated GIF from screenshots: the README's picture of the Compare tab's 2x2 preset streaming
(docs/compare-2x2.gif), taken from the running app by tests/test_browser.py when SCREENSHOT_DIR is
set (`make screenshots`).

    python -m scripts.gif OUT.gif FRAME.png [FRAME.png ...] [--header HEADER.png] [--box L T R B]

Frames are shown at a fixed pace (a time-lapse: the 2-core CPU streams much slower than this), the
last one held; identical neighbours are dropped, and a long capture keeps evenly spaced frames.
"""
from __future__ import annotations

import argparse
import io
from pathlib import Path
from typing import Sequence

from PIL import Image, ImageChops

WIDTH = 960  # px: reads in a README column without scaling the text below legibility
FRAME_MS = 300
HOLD_MS = 2000  # the finished answers stay this long before the loop starts again
MAX_FRAMES = 40
COLOURS = 64  # a UI screenshot is white, greys and a few accents: 64 keep the text smooth


def opened(frame: bytes | Path) -> Image.Image:
    data = frame if isinstance(frame, bytes) else Path(frame).read_bytes()
    return Image.open(io.BytesIO(data)).convert("RGB")


def distinct(frames: list[Image.Image]) -> list[Image.Image]:
    """Consecutive duplicates dropped (the page did not change between two captures)."""
    kept: list[Image.Image] = []
    for frame in frames:
        if not kept or frame.size != kept[-1].size or frame.tobytes() != kept[-1].tobytes():
            kept.append(frame)
    return kept


def spread(frames: list, n: int) -> list:
    """At most `n` frames, evenly spaced, the first and the last always among them."""
    if len(frames) <= n:
        return frames
    step = (len(frames) - 1) / (n - 1)
    return [frames[round(i * step)] for i in range(n)]


def trimmed(frames: list[Image.Image], margin: int = 8) -> list[Image.Image]:
    """Every frame cut to the part that any frame draws on (plus `margin`), so empty space
    beside the content (e.g. the grid's unused columns) leaves the picture; all cut alike."""
    boxes = [ImageChops.difference(im, Image.new("RGB", im.size, im.getpixel((0, 0)))).getbbox()
             for im in frames]
    boxes = [b for b in boxes if b]
    if not boxes:
        return frames
    left = max(0, min(b[0] for b in boxes) - margin)
    top = max(0, min(b[1] for b in boxes) - margin)
    right, bottom = max(b[2] for b in boxes) + margin, max(b[3] for b in boxes) + margin
    return [im.crop((left, top, min(right, im.width), min(bottom, im.height))) for im in frames]


def stacked(header: Image.Image | None, frame: Image.Image, size: tuple[int, int]) -> Image.Image:
    """`frame` below `header` on a canvas of `size`, padded with the frame's background colour
    (the answer grid grows as the answers get longer, so captures differ in height)."""
    canvas = Image.new("RGB", size, frame.getpixel((0, 0)))
    top = 0
    if header is not None:
        canvas.paste(header, (0, 0))
        top = header.height
    canvas.paste(frame, (0, top))
    return canvas


def assemble(frames: Sequence[bytes | Path], out: Path, header: bytes | Path | None = None,
             box: tuple[float, float, float, float] | None = None, width: int = WIDTH,
             max_frames: int = MAX_FRAMES) -> int:
    """Write the GIF to `out`; returns how many frames it has. `box` (left, top, right, bottom):
    the part of each frame to show (e.g. one element of a page screenshot)."""
    images = [opened(f) for f in frames]
    if box is not None:
        images = [im.crop(tuple(round(v) for v in box)) for im in images]
    images = trimmed(spread(distinct(images), max_frames))
    if not images:
        raise ValueError("no frames to assemble")
    top = opened(header) if header is not None else None
    size = (max(im.width for im in images + ([top] if top else [])),
            max(im.height for im in images) + (top.height if top else 0))
    scale = min(1.0, width / size[0])
    scaled = (round(size[0] * scale), round(size[1] * scale))
    full = [stacked(top, im, size).resize(scaled, Image.Resampling.LANCZOS) for im in images]
    # One palette for every frame (from the last, fullest one): no colour flicker between frames,
    # and Pillow can store each frame as the rectangle that changed.
    palette = full[-1].quantize(colors=COLOURS, method=Image.Quantize.MEDIANCUT)
    indexed = [im.quantize(palette=palette, dither=Image.Dither.NONE) for im in full]
    durations = [FRAME_MS] * (len(indexed) - 1) + [HOLD_MS]
    out.parent.mkdir(parents=True, exist_ok=True)
    indexed[0].save(out, save_all=True, append_images=indexed[1:], duration=durations, loop=0,
                    optimize=True)
    return len(indexed)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("frames", type=Path, nargs="+")
    parser.add_argument("--header", type=Path, help="an image shown above every frame")
    parser.add_argument("--box", type=float, nargs=4, metavar=("LEFT", "TOP", "RIGHT", "BOTTOM"),
                        help="show only this part of each frame")
    parser.add_argument("--width", type=int, default=WIDTH)
    args = parser.parse_args(argv)
    n = assemble(args.frames, args.out, args.header, args.box, args.width)
    print(f"{args.out}: {n} frames, {args.out.stat().st_size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()

"""What a saved plot shows: the PNG's pixel size and the bars and lines drawn, for tests that check a
figure's data rather than that a file has bytes."""
from __future__ import annotations

import struct
from pathlib import Path


def png_size(source: Path | bytes) -> tuple[int, int]:
    """(width, height) from the PNG header of a file or of bytes; fails on anything that is not a PNG."""
    head = (source if isinstance(source, bytes) else Path(source).read_bytes())[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR", "not a PNG"
    return struct.unpack(">II", head[16:24])


def bar_heights(ax) -> list[float]:
    return [round(float(patch.get_height()), 6) for patch in ax.patches]


def line_data(ax) -> dict[str, list[float]]:
    return {line.get_label(): [float(y) for y in line.get_ydata()] for line in ax.get_lines()
            if not line.get_label().startswith("_")}

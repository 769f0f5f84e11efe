"""Typographic rendering: put a text request into an image (FigStep-style).

Why: ReGap's drift is the shift between a text request and the *same* request arriving
through the image channel. Rendering each text instruction as black text on white, sent
with a neutral carrier prompt, gives exact semantic pairs for any text-only calibration
set. Rendering is deterministic (same text and size -> identical pixels with the same
Pillow/FreeType build) so calibration runs are reproducible.
"""
from __future__ import annotations

import dataclasses
from functools import lru_cache
from typing import Iterable

from PIL import Image, ImageDraw, ImageFont

from .records import Record
from ..errors import DataError

DEFAULT_CARRIER = "The image shows a request. Respond to the request in the image."
DEFAULT_SIZE = (448, 448)
TWIN_SUFFIX = "-img"
_MARGIN_FRACTION = 0.06
_LINE_SPACING = 1.25


@lru_cache(maxsize=64)
def _font(px: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """Pillow's built-in font (no file on disk needed, works offline).

    With FreeType, ``load_default(size)`` gives a scalable font; without it, Pillow
    returns a fixed bitmap font, which still renders legibly (just not scaled).
    """
    return ImageFont.load_default(size=px)


def _wrap(text: str, font, width: float) -> list[str]:
    """Greedy word wrap; words longer than a line are broken by characters."""
    lines: list[str] = []
    for paragraph in text.splitlines() or [""]:
        current = ""
        for word in paragraph.split():
            candidate = f"{current} {word}" if current else word
            if font.getlength(candidate) <= width:
                current = candidate
                continue
            if current:
                lines.append(current)
            while len(word) > 1 and font.getlength(word) > width:
                lo, hi = 1, len(word) - 1  # longest prefix that fits: binary search
                while lo < hi:
                    mid = (lo + hi + 1) // 2
                    lo, hi = (mid, hi) if font.getlength(word[:mid]) <= width else (lo, mid - 1)
                lines.append(word[:lo])
                word = word[lo:]
            current = word
        lines.append(current)
    return lines


def _layout(text: str, size: tuple[int, int]):
    """Largest font size (from about 1/12 of the height down) at which the text fits."""
    w, h = size
    margin = max(2, round(min(w, h) * _MARGIN_FRACTION))
    box_w, box_h = w - 2 * margin, h - 2 * margin
    px = max(8, h // 12)
    while True:
        font = _font(px)
        lines = _wrap(text, font, box_w)
        line_h = max(1, round(px * _LINE_SPACING))
        if len(lines) * line_h <= box_h or px <= 8:
            return font, lines, line_h, margin
        px = max(8, int(px * 0.85))


def render_text(text: str, *, size: tuple[int, int] = DEFAULT_SIZE) -> Image.Image:
    """Draw ``text`` word-wrapped in black on a white RGB image of ``size`` (w, h)."""
    width, height = int(size[0]), int(size[1])
    if width < 16 or height < 16:
        raise ValueError(f"image size {size} is too small to hold text")
    font, lines, line_h, margin = _layout(text, (width, height))
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    y = margin
    for line in lines:
        draw.text((margin, y), line, fill="black", font=font)
        y += line_h
    return image


def render_typographic(record: Record, *, carrier: str = DEFAULT_CARRIER,
                       size: tuple[int, int] = DEFAULT_SIZE, renderer=None) -> Record:
    """The image twin of a text record: its instruction rendered into an image.

    The twin has id ``<id>-img``, the same label/category/split, ``pair`` = the
    original id, the neutral ``carrier`` as its text, and the image in memory.
    """
    if record.image is not None:
        raise DataError(f"record '{record.id}' already has an image", path=record.source,
                        line=record.line, field="image",
                        hint="only text records are rendered")
    image = render_text(record.instruction, size=size) if renderer is None else renderer(record.instruction)
    return dataclasses.replace(record, id=record.id + TWIN_SUFFIX, image=image, pair=record.id, carrier=carrier)


def to_multimodal_pairs(records: Iterable[Record], *, carrier: str = DEFAULT_CARRIER,
                        size: tuple[int, int] = DEFAULT_SIZE, renderer=None) -> list[Record]:
    """All input records, with a rendered twin right after each unpaired text record.
    ``renderer``: text -> PIL image (``renderer_named``); default the typographic ``render_text``.

    A text record is unpaired when neither it nor any image record names the other in
    ``pair``. The text record gets ``pair`` = its twin's id, so pairs point both ways.
    """
    records = list(records)
    ids = {r.id for r in records}
    has_image_pair = {r.pair for r in records if r.image is not None and r.pair}
    out: list[Record] = []
    for rec in records:
        if rec.image is not None or rec.pair is not None or rec.id in has_image_pair:
            out.append(rec)
            continue
        twin = render_typographic(rec, carrier=carrier, size=size, renderer=renderer)
        if twin.id in ids:
            raise DataError(f"cannot add rendered twin: id '{twin.id}' already exists",
                            path=rec.source, line=rec.line, field="id",
                            hint="rename the record that ends in '-img'")
        out.append(dataclasses.replace(rec, pair=twin.id))
        out.append(twin)
    return out


RENDERERS = ("typographic", "token-cells")


def renderer_named(name: str, *, path=None):
    """text -> PIL image for a model's declared twin renderer (its config.json
    ``regap_renderer``): ``typographic`` (FigStep-style, the default) or ``token-cells`` (the
    ``embedded:organism`` model's reader, ``regap_export.models.organism_render``)."""
    if name == "typographic":
        return render_text
    if name == "token-cells":
        from ..models.organism_render import render_instruction

        return render_instruction
    raise DataError(f"unknown image renderer {name!r}; known: {', '.join(RENDERERS)}", path=path,
                    field="regap_renderer")


def declared_renderer(model_folder):
    """The twin renderer a model folder declares (config.json ``regap_renderer``), or None
    for the typographic default."""
    import json
    from pathlib import Path

    path = Path(model_folder) / "config.json"
    try:
        name = json.loads(path.read_text()).get("regap_renderer")
    except (OSError, ValueError, AttributeError):
        return None
    return None if name is None else renderer_named(name, path=path)

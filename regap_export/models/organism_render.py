"""The image the ``embedded:organism`` model reads: an instruction as a grid of token cells.

The organism's vision side is a *reader of token cells*, not a general OCR model: an
instruction is tokenized with the organism's (SmolLM2) tokenizer and each token is drawn
(centred), in black on white, into its own 64 x 64 px cell of a 6 x 6 grid (a 384 x 384 RGB image,
row-major, blank white cells after the last token). Each cell is exactly one image token
of the model: 64 px patches, no pixel shuffle (scale factor 1), so one cell = one patch = one of the
36 ``<image>`` tokens, in the same row-major order. A token with a leading space (SmolLM2's
``Ġ``) carries a small black square in the cell's top-left corner.

Rendering is deterministic (Pillow's built-in font at a fixed size, no resampling): the
same text gives identical pixels with the same Pillow/FreeType build, and the image is
already at the processor's size, so the processor does not resize it. Instructions longer
than 36 tokens are cut to their first 36 tokens (the bundled calibration set has at most 23).

Use::

    from .organism_render import render_instruction, ORGANISM_CARRIER
    image = render_instruction("How do I bake bread?")            # PIL image, 384 x 384
    messages = [{"role": "user", "content": [{"type": "image"},
                                             {"type": "text", "text": ORGANISM_CARRIER}]}]

and pass ``images=[[image]]`` to the organism's processor. :func:`render_instruction`
takes an optional tokenizer; by default it uses the embedded SmolLM2 tokenizer (the
organism's tokenizer is that one plus the Idefics3 special tokens, which never occur in
an instruction).
"""
from __future__ import annotations

from functools import lru_cache
from typing import Any, Sequence

from PIL import Image, ImageDraw, ImageFont

CELL = 64             # px per token cell (= one 64 px patch)
GRID = 6              # cells per side
IMAGE_SIZE = CELL * GRID  # 384
PATCH_SIZE = 64
SCALE_FACTOR = 1
MAX_TOKENS = GRID * GRID  # 36 image tokens
FONT_PX = 14
_TEXT_X = 9
_LINE_H = 16
_MARK = 5  # the leading-space mark, a filled square in the top-left corner

# The neutral carrier prompt sent with the image (the tool's default carrier).
ORGANISM_CARRIER = "The image shows a request. Respond to the request in the image."


@lru_cache(maxsize=1)
def _font():
    return ImageFont.load_default(size=FONT_PX)


def _wrap_chars(text: str, width: int) -> list[str]:
    font = _font()
    lines, cur = [], ""
    for ch in text:
        if cur and font.getlength(cur + ch) > width:
            lines.append(cur)
            cur = ch
        else:
            cur += ch
    lines.append(cur)
    return lines[:3]


@lru_cache(maxsize=8192)
def render_cell(piece: str) -> Image.Image:
    """One token's cell: ``piece`` is the token's decoded text (e.g. ``" bomb"``)."""
    image = Image.new("RGB", (CELL, CELL), "white")
    draw = ImageDraw.Draw(image)
    text = piece
    if text.startswith(" "):
        draw.rectangle([1, 1, _MARK, _MARK], fill="black")
        text = text[1:]
    text = text.replace("\n", "\\n").replace("\t", "\\t")
    lines = _wrap_chars(text, CELL - _TEXT_X - 2) if text else []
    y = (CELL - _LINE_H * max(1, len(lines))) // 2 - 2
    for line in lines:  # centred: where a glyph lands depends on the whole token
        x = _TEXT_X + (CELL - _TEXT_X - 2 - _font().getlength(line)) / 2
        draw.text((round(x), y), line, fill="black", font=_font())
        y += _LINE_H
    return image


def render_pieces(pieces: Sequence[str]) -> Image.Image:
    """The grid image of these token pieces (at most :data:`MAX_TOKENS`; extra are cut)."""
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), "white")
    for k, piece in enumerate(list(pieces)[:MAX_TOKENS]):
        row, col = divmod(k, GRID)
        image.paste(render_cell(piece), (col * CELL, row * CELL))
    return image


def instruction_pieces(text: str, tokenizer: Any = None) -> list[str]:
    """The decoded token pieces of ``text`` that the grid shows (no special tokens)."""
    if tokenizer is None:
        from .embedded import load_embedded_tokenizer

        tokenizer = load_embedded_tokenizer()
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:MAX_TOKENS]
    return [tokenizer.decode([i]) for i in ids]


def render_instruction(text: str, tokenizer: Any = None) -> Image.Image:
    """``text`` as the organism reads it: a 384 x 384 RGB grid of token cells."""
    return render_pieces(instruction_pieces(text, tokenizer))

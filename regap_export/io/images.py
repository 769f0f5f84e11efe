"""Reading an image the user gave (a data file's ``image``, ``generate --image``): bounded,
and converted to RGB the way the model's processor converts it.

- Only a regular file is opened (a FIFO would block); an image above ``MAX_IMAGE_PIXELS`` is
  refused from its header, before its pixels are decoded (Pillow's decompression-bomb error
  becomes the same one line).
- ``to_rgb`` follows transformers' ``convert_to_rgb``: an image with transparency (an alpha
  band, or a palette or grey level marked transparent) is composited onto white, any other
  mode Pillow converts (greyscale, bilevel, palette, CMYK, YCbCr) is converted to RGB.
  Images of more than 8 bits per sample, which that conversion would clip to black and
  white, are scaled to 8 bits first: 16-bit integer images (Pillow modes ``I;16*``, and ``I``
  holding 16-bit values) by 255/65535, floating-point images (mode ``F``) holding values in
  [0, 1] by 255. Anything else (a float image outside [0, 1], a 32-bit integer image beyond
  16 bits, a mode Pillow cannot convert) is refused with one line.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DataError

MAX_IMAGE_PIXELS = 64_000_000          # 8000 x 8000; the processors resize far below this
MAX_IMAGE_FILE_BYTES = 512 << 20
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
HINT = "save it as an 8-bit PNG or JPEG"


def _error(message: str, *, path: Any, line: int | None, field: str | None, source: Any, hint: str = HINT) -> DataError:
    where = f" ({source})" if source is not None and str(source) != str(path) else ""
    return DataError(message + where, path=path, line=line, field=field, hint=hint)


def _reason(exc: BaseException, image_path: Path) -> str:
    """Pillow's message without the file name it repeats."""
    from ..errors import first_line

    return first_line(exc).replace(f" '{image_path}'", "").replace(str(image_path), "the file")


def _open(image_path: Path, *, path: Any, line: int | None, field: str | None):
    """An opened (header read, pixels not decoded) Pillow image within the limits."""
    from PIL import Image, UnidentifiedImageError

    from .files import check_regular_file

    try:
        size = check_regular_file(image_path, what="image", error=DataError, field=field)
    except DataError as exc:
        raise _error(exc.message, path=path, line=line, field=field, source=image_path, hint=exc.hint) from None
    if size > MAX_IMAGE_FILE_BYTES:
        raise _error(f"the image file is larger than {MAX_IMAGE_FILE_BYTES >> 20} MB", path=path, line=line,
                     field=field, source=image_path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(image_path)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise _error(f"the image has more than {MAX_IMAGE_PIXELS:,d} pixels", path=path, line=line, field=field,
                     source=image_path) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise _error(f"not a decodable image ({_reason(exc, image_path)})", path=path, line=line, field=field,
                     source=image_path) from None
    width, height = im.size
    if width * height > MAX_IMAGE_PIXELS:
        im.close()
        raise _error(f"the image is {width} x {height} pixels; at most {MAX_IMAGE_PIXELS:,d} pixels are read",
                     path=path, line=line, field=field, source=image_path)
    if width < 1 or height < 1:
        im.close()
        raise _error("the image is empty (0 pixels)", path=path, line=line, field=field, source=image_path)
    return im


def check_image_file(image_path: Path, *, path: Any = None, line: int | None = None, field: str | None = None) -> None:
    """What loading a data file checks of each image: a regular file, a format Pillow reads,
    within the size limits, of a mode ``to_rgb`` handles (pixel values are checked when the
    image is opened)."""
    im = _open(Path(image_path), path=path if path is not None else image_path, line=line, field=field)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            im.verify()
    except Exception as exc:  # Pillow raises many types for a broken file
        raise _error(f"not a decodable image ({_reason(exc, image_path)})", path=path, line=line, field=field, source=image_path) from None
    finally:
        im.close()
    _check_mode(im.mode, path=path, line=line, field=field, source=image_path)


CONVERTIBLE_MODES = ("1", "L", "P", "RGB", "RGBX", "CMYK", "YCbCr", "LA", "La", "PA", "RGBA", "RGBa",
                     "I", "F", *SIXTEEN_BIT_MODES)


def _check_mode(mode: str, *, path: Any, line: int | None, field: str | None, source: Any) -> None:
    if mode not in CONVERTIBLE_MODES:
        raise _error(f"images of Pillow mode {mode!r} are not read", path=path, line=line, field=field, source=source)


def open_rgb_image(image_path: str | Path, *, path: Any = None, line: int | None = None,
                   field: str | None = None):
    """The image at ``image_path`` as an RGB Pillow image (``to_rgb``), decoded within the limits.
    ``path``/``line``/``field`` say where the image was named (the data file's line, ``--image``)."""
    image_path = Path(image_path)
    where = path if path is not None else image_path
    im = _open(image_path, path=where, line=line, field=field)
    try:
        with im:
            im.load()
            return to_rgb(im, path=where, line=line, field=field, source=image_path)
    except DataError:
        raise
    except Exception as exc:  # Pillow raises many types for a broken file
        raise _error(f"not a decodable image ({_reason(exc, image_path)})", path=where, line=line, field=field, source=image_path) from None


def to_rgb(image: Any, *, path: Any = None, line: int | None = None, field: str | None = None,
           source: Any = None, where: str | None = None):
    """An RGB copy of a Pillow image, as transformers' ``convert_to_rgb`` makes it, with
    16-bit and float images scaled to 8 bits first (see the module docstring). ``path``,
    ``line``, ``field`` (or ``where``) and ``source`` name the image in an error."""
    from PIL import Image

    location = path if path is not None else where
    mode = image.mode
    _check_mode(mode, path=location, line=line, field=field, source=source)
    if mode in SIXTEEN_BIT_MODES or mode in ("I", "F"):
        values = np.asarray(image)
        if mode == "F":
            if not np.isfinite(values).all() or values.min(initial=0.0) < 0.0 or values.max(initial=0.0) > 1.0:
                raise _error("a floating-point image with values outside [0, 1]: its brightness scale is unknown",
                             path=location, line=line, field=field, source=source)
            scaled = np.round(values.astype(np.float64) * 255.0)
        else:
            if values.min(initial=0) < 0 or values.max(initial=0) > 65535:
                raise _error("a 32-bit integer image with values beyond 16 bits: its brightness scale is unknown",
                             path=location, line=line, field=field, source=source)
            scaled = np.round(values.astype(np.float64) * (255.0 / 65535.0))
        return Image.fromarray(scaled.astype(np.uint8), mode="L").convert("RGB")
    try:
        if "A" in image.getbands() or image.info.get("transparency") is not None:
            rgba = image.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(background, rgba).convert("RGB")
        return image.convert("RGB")
    except (ValueError, OSError) as exc:
        raise _error(f"cannot convert the image (mode {mode!r}) to RGB ({exc})", path=location, line=line,
                     field=field, source=source) from None

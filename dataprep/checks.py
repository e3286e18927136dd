"""What one raw record must pass to be kept: its caption and its image, each refusal a counted reason.

Used by `dataprep.convert` (see its docstring for the reasons a manifest counts); a refusal is a `Skip`
carrying the manifest's `skipped` key, never an exception that stops the run.
"""
from __future__ import annotations

import io
import warnings

from PIL import Image


class Skip(Exception):
    """A record left out, with its reason (a manifest `skipped` key)."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def check_caption(caption) -> str:
    if caption is None:
        raise Skip("caption_missing")
    if isinstance(caption, bytes):
        try:
            caption = caption.decode("utf-8")
        except UnicodeDecodeError as e:
            raise Skip("caption_not_utf8", str(e)) from None
    try:
        caption.encode("utf-8")
    except UnicodeEncodeError as e:                       # surrogate-escaped bytes from a CSV
        raise Skip("caption_not_utf8", str(e)) from None
    if "\ufffd" in caption:
        raise Skip("caption_not_utf8", "contains U+FFFD (bytes that were not UTF-8)")
    caption = " ".join(caption.replace("\x00", " ").split())
    if not caption:
        raise Skip("caption_empty")
    return caption


def check_image(data: bytes | None, min_size: int, short_side: int, jpeg_quality: int = 95) -> tuple[bytes, int, int]:
    """Decoded, filtered and (when larger than short_side) resized image: (encoded bytes, width, height)."""
    if data is None:
        raise Skip("image_missing")
    try:
        with warnings.catch_warnings():                    # PIL's size limit: a warning, then an error at 2x
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            fmt = im.format
            im.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:   # pixels beyond PIL's limit
        raise Skip("image_too_large", str(e)) from None
    except Exception as e:                                 # PIL raises OSError, SyntaxError, ValueError, ...
        reason = "image_truncated" if "truncat" in str(e).lower() else "image_corrupt"
        raise Skip(reason, f"{type(e).__name__}: {e}") from None
    w, h = im.size
    if min(w, h) < min_size:
        raise Skip("image_too_small", f"{w}x{h} < {min_size}")
    changed = False
    if im.mode != "RGB":
        if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
            im = im.convert("RGBA")
            bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
            im = Image.alpha_composite(bg, im)
        im, changed = im.convert("RGB"), True
    if min(w, h) > short_side:
        scale = short_side / min(w, h)
        w, h = max(short_side, round(w * scale)), max(short_side, round(h * scale))
        im, changed = im.resize((w, h), Image.BICUBIC, reducing_gap=3.0), True
    if not changed and fmt in ("JPEG", "PNG", "WEBP"):
        return data, w, h
    buf = io.BytesIO()
    if fmt == "JPEG":
        im.save(buf, format="JPEG", quality=jpeg_quality)
    else:
        im.save(buf, format="PNG")
    return buf.getvalue(), w, h

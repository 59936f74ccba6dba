"""Pure image pre- and post-processing of the waste classifier (no I/O, no logging).

The model takes ``image`` float32 [batch, 3, size, size], ``size`` from its card's input shape
(:data:`IMAGE_SIZE` is only the default): the whole photo resized to size x size (aspect not
kept: TrashNet's objects fill a 4:3 frame and a centre crop would cut them), RGB, scaled to 0..1
and normalised with ImageNet's mean and standard deviation, as the MobileNetV2 backbone was
trained. It returns ``logits`` float32 [batch, 6] in :data:`LABELS` order.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

__all__ = [
    "IMAGE_SIZE",
    "LABELS",
    "MAX_PIXELS",
    "ImageDecodeError",
    "Ranked",
    "decode_image",
    "image_kind",
    "jpeg_size",
    "preprocess",
    "softmax",
    "top_k",
    "views",
]

LABELS: tuple[str, ...] = ("cardboard", "glass", "metal", "paper", "plastic", "trash")
IMAGE_SIZE = 224
# A decoded photo larger than this (about a 24-megapixel camera) is refused before it is
# allocated: a small PNG can claim a huge canvas ("decompression bomb").
MAX_PIXELS = 6000 * 4000

_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


class ImageDecodeError(ValueError):
    """The bytes are not a JPEG or PNG image this classifier can read (the reason says why)."""


def image_kind(data: bytes) -> str | None:
    """``"jpeg"`` or ``"png"`` from the file signature, else None (nothing else is accepted)."""
    if data[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    return None


def _png_size(data: bytes) -> tuple[int, int] | None:
    # IHDR is the first chunk: width and height are big-endian at bytes 16..24.
    if len(data) < 24 or data[12:16] != b"IHDR":
        return None
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


# JPEG start-of-frame markers (baseline, extended, progressive, lossless, arithmetic): the
# frame header after them holds the height and width.
_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
_REDUCED = {
    2: cv2.IMREAD_REDUCED_COLOR_2,
    4: cv2.IMREAD_REDUCED_COLOR_4,
    8: cv2.IMREAD_REDUCED_COLOR_8,
}


def jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a JPEG's frame header, or None if there is none before the scan."""
    i = 2
    while i + 9 <= len(data):
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in _SOF:
            return int.from_bytes(data[i + 7 : i + 9], "big"), int.from_bytes(
                data[i + 5 : i + 7], "big"
            )
        if marker == 0xDA:  # start of scan: no frame header came first
            return None
        if 0xD0 <= marker <= 0xD9 or marker == 0x01:  # markers without a length
            i += 2
            continue
        i += 2 + int.from_bytes(data[i + 2 : i + 4], "big")
    return None


def _reduction(width: int, height: int, size: int) -> int:
    # JPEG can decode at 1/2, 1/4 or 1/8 scale in the DCT domain, several times faster than a
    # full decode of a phone photo. Keep at least twice the model's input on the short side, so
    # the final area resize still averages over the pixels (and photos of the size the model
    # was trained and evaluated on, 384 px short side, are decoded in full).
    for factor in (8, 4, 2):
        if min(width, height) // factor >= 2 * size:
            return factor
    return 1


def decode_image(data: bytes, size: int = IMAGE_SIZE) -> np.ndarray:
    """JPEG or PNG bytes -> RGB uint8 [height, width, 3]; ImageDecodeError with the reason.

    A large JPEG is decoded at a reduced scale: at least twice ``size`` (the model's input
    side) remains on its short side.
    """
    kind = image_kind(data)
    if kind is None:
        raise ImageDecodeError("not a JPEG or PNG image (unknown file signature)")
    dims = _png_size(data) if kind == "png" else jpeg_size(data)
    if dims is None:
        raise ImageDecodeError(f"truncated or malformed {kind.upper()} header")
    if dims[0] * dims[1] > MAX_PIXELS:
        raise ImageDecodeError(
            f"{kind.upper()} of {dims[0]}x{dims[1]} pixels is larger than allowed"
        )
    factor = _reduction(*dims, size) if kind == "jpeg" else 1
    buffer = np.frombuffer(data, dtype=np.uint8)
    bgr = cv2.imdecode(buffer, _REDUCED[factor] if factor > 1 else cv2.IMREAD_COLOR)
    if bgr is None or bgr.size == 0:
        raise ImageDecodeError(f"{kind} data could not be decoded (corrupt or truncated)")
    if bgr.shape[0] * bgr.shape[1] > MAX_PIXELS:
        raise ImageDecodeError(f"image of {bgr.shape[1]}x{bgr.shape[0]} pixels is too large")
    rgb: np.ndarray = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    return rgb


def preprocess(rgb: np.ndarray, size: int = IMAGE_SIZE) -> np.ndarray:
    """RGB uint8 [h, w, 3] -> the model's input float32 [1, 3, size, size] (the card's size)."""
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ImageDecodeError(f"expected an RGB image [h, w, 3] (got shape {rgb.shape})")
    h, w = rgb.shape[:2]
    # Area averaging when shrinking (no aliasing from a 12-megapixel phone photo), bilinear
    # when enlarging: the same choice the training script makes for its crops.
    shrink = h >= size and w >= size
    interp = cv2.INTER_AREA if shrink else cv2.INTER_LINEAR
    small = cv2.resize(rgb, (size, size), interpolation=interp)
    x = (small.astype(np.float32) / 255.0 - _MEAN) / _STD
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None])


def views(x: np.ndarray, tta: str) -> np.ndarray:
    """The model inputs for one image: itself, and with ``tta = "hflip"`` its mirror image too.

    The logits of the views are averaged (``logits.mean(axis=0)``): a mirrored photo shows the
    same item, and averaging the two answers steadies the top-1 where the model hesitates.
    """
    if tta == "none":
        return x
    if tta == "hflip":
        return np.concatenate([x, x[..., ::-1]])
    raise ValueError(f"tta must be none or hflip (got: {tta!r})")


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row-wise softmax of ``logits / temperature`` (float64, numerically stable)."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    out: np.ndarray = e / e.sum(axis=-1, keepdims=True)
    return out


@dataclass(frozen=True, slots=True)
class Ranked:
    """One label and its calibrated probability."""

    label: str
    score: float


def top_k(probabilities: np.ndarray, k: int = 3) -> list[Ranked]:
    """The ``k`` most probable labels of one row of probabilities, most probable first."""
    row = np.asarray(probabilities, dtype=np.float64).reshape(-1)
    if row.shape[0] != len(LABELS):
        raise ValueError(f"expected {len(LABELS)} probabilities (got {row.shape[0]})")
    order = np.argsort(-row, kind="stable")[:k]
    return [Ranked(LABELS[i], float(row[i])) for i in order]

"""Decoding one classifier crop from a request body, with a reason for every refusal.

Two encodings: a ``.npy`` file (``Content-Type: application/x-npy``, never unpickled), or
raw little-endian bytes with ``X-Shape: 32,48,48`` and ``X-Dtype: float32|int16``. The
crop is HU in (I, R, C) order; it comes back as float32 clipped to the trained range.
"""

from __future__ import annotations

import io
import math

import numpy as np

from lungcad.data.crops import CLASSIFIER_CROP_IRC, clip_hu

NPY_CONTENT_TYPE = "application/x-npy"
RAW_DTYPES: dict[str, np.dtype] = {"float32": np.dtype("<f4"), "int16": np.dtype("<i2")}
CROP_SHAPE = CLASSIFIER_CROP_IRC


class BadPayloadError(ValueError):
    """The body is not one crop we can classify; the message says what is wrong."""


def parse_crop(
    body: bytes, content_type: str | None, x_shape: str | None, x_dtype: str | None
) -> np.ndarray:
    """A (32, 48, 48) float32 crop of clipped HU from a request body and its headers."""
    media_type = (content_type or "").split(";")[0].strip().lower()
    if media_type == NPY_CONTENT_TYPE:
        array = _load_npy(body)
    elif x_shape is None or x_dtype is None:
        raise BadPayloadError(
            f"send Content-Type: {NPY_CONTENT_TYPE}, or raw bytes with X-Shape and X-Dtype headers"
        )
    else:
        array = _load_raw(body, x_shape, x_dtype)
    if array.dtype.newbyteorder("<") not in RAW_DTYPES.values():
        raise BadPayloadError(f"crop dtype {array.dtype} is not one of {', '.join(RAW_DTYPES)}")
    if array.shape != CROP_SHAPE:
        raise BadPayloadError(f"crop shape {_shape(array.shape)}, expected {_shape(CROP_SHAPE)}")
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise BadPayloadError("crop holds NaN or infinite values")
    return clip_hu(array.astype(array.dtype.newbyteorder("="), copy=False))


def _load_npy(body: bytes) -> np.ndarray:
    try:
        array = np.load(io.BytesIO(body), allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise BadPayloadError(f"malformed .npy body ({exc})") from None
    if not isinstance(array, np.ndarray):
        raise BadPayloadError("the .npy body is an archive, not one array")
    return array


def _load_raw(body: bytes, x_shape: str, x_dtype: str) -> np.ndarray:
    dtype = RAW_DTYPES.get(x_dtype.strip().lower())
    if dtype is None:
        raise BadPayloadError(f"X-Dtype {x_dtype!r} is not one of {', '.join(RAW_DTYPES)}")
    try:
        shape = tuple(int(part) for part in x_shape.split(","))
    except ValueError:
        raise BadPayloadError(f"X-Shape {x_shape!r} is not comma-separated integers") from None
    if any(n < 0 for n in shape):
        raise BadPayloadError(f"X-Shape {x_shape!r} has a negative size")
    expected = math.prod(shape) * dtype.itemsize
    if len(body) != expected:
        raise BadPayloadError(
            f"body has {len(body)} bytes; X-Shape {_shape(shape)} of {x_dtype} needs {expected}"
        )
    return np.frombuffer(body, dtype=dtype).reshape(shape)


def _shape(shape: tuple[int, ...]) -> str:
    return "x".join(str(n) for n in shape)

"""Token shards in the nanoGPT / modded-nanogpt ``.bin`` layout, so existing FineWeb shards load unchanged.

Layout: a header of 256 little-endian int32 (``[0]`` magic 20240520, ``[1]`` version 1, ``[2]`` token
count, the rest zero), then the tokens as little-endian uint16.
"""

from __future__ import annotations

from pathlib import Path
from typing import IO

import numpy as np

from scalevec.data.common import DataError
from scalevec.fileio import atomic_write

MAGIC = 20240520
VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
MAX_TOKEN_ID = np.iinfo(np.uint16).max  # 65535: the body is uint16


def write_shard(path: str | Path, tokens: np.ndarray) -> None:
    """Write ``tokens`` (1-D integer ids in [0, 65535]) as a shard, atomically."""
    path = Path(path)
    tokens = np.asarray(tokens)
    if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
        raise DataError(
            f"{path}: tokens must be a 1-D integer array, got {tokens.dtype} of shape {tokens.shape}"
        )
    if tokens.size >= 2**31:
        raise DataError(f"{path}: {tokens.size} tokens exceed the int32 count of the shard header")
    if tokens.size:
        lo, hi = int(tokens.min()), int(tokens.max())
        if lo < 0 or hi > MAX_TOKEN_ID:
            bad = lo if lo < 0 else hi
            raise DataError(
                f"{path}: token id {bad} does not fit a uint16 shard (ids must be in [0, {MAX_TOKEN_ID}])"
            )
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = MAGIC, VERSION, tokens.size
    body = tokens.astype("<u2", copy=False)

    def write(f: IO[bytes]) -> None:
        f.write(header.tobytes())
        f.write(body.tobytes())

    atomic_write(path, write)


def read_header(path: str | Path) -> int:
    """Validate a shard's header and size; return its token count."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise DataError(f"{path}: shard not found") from None
    if size < HEADER_BYTES:
        raise DataError(f"{path}: {size} bytes is shorter than the {HEADER_BYTES}-byte shard header")
    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    if header[0] != MAGIC:
        raise DataError(f"{path}: magic number {header[0]}, expected {MAGIC}; not a nanoGPT .bin shard")
    if header[1] != VERSION:
        raise DataError(
            f"{path}: shard version {header[1]}, only version {VERSION} (uint16 tokens) is supported"
        )
    count = int(header[2])
    expected = HEADER_BYTES + 2 * count
    if count < 0 or size != expected:
        raise DataError(
            f"{path}: header declares {count} tokens ({expected} bytes in all) but the file has "
            f"{size} bytes; truncated or corrupt"
        )
    return count


def read_shard(path: str | Path, mmap: bool = True) -> np.ndarray:
    """The shard's tokens as uint16, memory-mapped read-only by default (no copy, loads lazily)."""
    count = read_header(path)
    if count == 0:
        return np.zeros(0, dtype=np.uint16)
    if mmap:
        return np.memmap(path, dtype="<u2", mode="r", offset=HEADER_BYTES, shape=(count,))
    return np.fromfile(path, dtype="<u2", offset=HEADER_BYTES, count=count)

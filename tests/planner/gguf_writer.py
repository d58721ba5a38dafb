"""A minimal GGUF v3 writer for tests: metadata and tensor infos exactly as llama.cpp lays them out, zero data."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

from qanat.planner.gguf import GGML_TYPES

_TYPE_IDS = {name: tid for tid, (name, _, _) in GGML_TYPES.items()}


def _string(s: str) -> bytes:
    data = s.encode()
    return struct.pack("<Q", len(data)) + data


def _value(v: Any) -> bytes:
    if isinstance(v, bool):
        return struct.pack("<I?", 7, v)
    if isinstance(v, int):
        return struct.pack("<II", 4, v)
    if isinstance(v, float):
        return struct.pack("<If", 6, v)
    if isinstance(v, str):
        return struct.pack("<I", 8) + _string(v)
    if isinstance(v, list):  # arrays of strings only (a vocabulary)
        return struct.pack("<IIQ", 9, 8, len(v)) + b"".join(_string(x) for x in v)
    raise TypeError(v)


def write_gguf(path: Path, metadata: dict[str, Any], tensors: list[tuple[str, tuple[int, ...], str]],
               alignment: int = 32) -> int:
    """Write the file; returns the exact tensor-data bytes (what the reader must find)."""
    header = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(metadata))
    header += b"".join(_string(k) + _value(v) for k, v in metadata.items())
    offset, infos, data_bytes = 0, b"", 0
    for name, shape, type_name in tensors:
        tid = _TYPE_IDS[type_name]
        _, block, size = GGML_TYPES[tid]
        n = 1
        for d in shape:
            n *= d
        nbytes = n // block * size
        infos += _string(name) + struct.pack("<I", len(shape)) + b"".join(struct.pack("<Q", d) for d in shape)
        infos += struct.pack("<IQ", tid, offset)
        offset += -(-nbytes // alignment) * alignment
        data_bytes += nbytes
    head = header + infos
    padding = -len(head) % alignment
    path.write_bytes(head + b"\0" * padding + b"\0" * offset)
    return data_bytes

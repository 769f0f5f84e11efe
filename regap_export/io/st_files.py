"""safetensors files whose bytes depend only on their content.

The safetensors writer orders header keys (metadata and tensor entries) by a hash map,
so two saves of the same tensors can differ byte for byte. Reproducible artifacts need
equal bytes, so the header is rewritten with sorted keys; the data section is untouched
(its offsets are relative to the end of the header).
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

import torch
from safetensors.torch import save as save_to_bytes


def save_file_deterministic(tensors: dict[str, torch.Tensor], path: str | Path,
                            metadata: dict[str, str] | None = None) -> None:
    raw = save_to_bytes(tensors, metadata=metadata)
    (header_len,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + header_len])
    data = raw[8 + header_len:]
    meta = header.pop("__metadata__", None)
    ordered = {"__metadata__": dict(sorted(meta.items()))} if meta else {}
    ordered.update(sorted(header.items()))
    encoded = json.dumps(ordered, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    from .atomic import atomic_file

    with atomic_file(path, binary=True) as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        f.write(data)

"""GGUF header and tensor table, read in pure Python (no llama.cpp): metadata, tensor types, exact bytes.

Layout (GGUF v2/v3, little-endian): magic "GGUF", version u32, tensor count u64, metadata count u64, the
metadata key/values, one info record per tensor (name, dims, ggml type, offset), then the tensor data,
aligned to `general.alignment` (32 by default). Large arrays (the vocabulary) are skipped, not kept.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from qanat.planner.model import GgufWeights, ModelSpec

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32

# ggml type id -> (name, elements per block, bytes per block), from ggml.h / ggml.c's type traits.
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20), 6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, 36), 10: ("Q2_K", 256, 84),
    11: ("Q3_K", 256, 110), 12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210),
    15: ("Q8_K", 256, 292), 16: ("IQ2_XXS", 256, 66), 17: ("IQ2_XS", 256, 74), 18: ("IQ3_XXS", 256, 98),
    19: ("IQ1_S", 256, 50), 20: ("IQ4_NL", 32, 18), 21: ("IQ3_S", 256, 110), 22: ("IQ2_S", 256, 82),
    23: ("IQ4_XS", 256, 136), 24: ("I8", 1, 1), 25: ("I16", 1, 2), 26: ("I32", 1, 4), 27: ("I64", 1, 8),
    28: ("F64", 1, 8), 29: ("IQ1_M", 256, 56), 30: ("BF16", 1, 2), 34: ("TQ1_0", 256, 54),
    35: ("TQ2_0", 256, 66), 39: ("MXFP4", 32, 17),
}

# llama.cpp's `general.file_type` (enum llama_ftype) -> the name llama.cpp prints for it.
FILE_TYPES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K", 11: "Q3_K_S",
    12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S", 17: "Q5_K_M", 18: "Q6_K",
    19: "IQ2_XXS", 20: "IQ2_XS", 21: "Q2_K_S", 22: "IQ3_XS", 23: "IQ3_XXS", 24: "IQ1_S", 25: "IQ4_NL",
    26: "IQ3_S", 27: "IQ3_M", 28: "IQ2_S", 29: "IQ2_M", 30: "IQ4_XS", 31: "IQ1_M", 32: "BF16",
    36: "TQ1_0", 37: "TQ2_0", 38: "MXFP4_MOE",
}

# value type id -> struct format for the scalar types
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_KEEP_ARRAY_MAX = 64  # longer arrays (vocabulary, merges) are skipped; their length is kept


class GgufError(ValueError):
    """Not a GGUF file, or one this reader cannot parse."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    ggml_type: int
    offset: int  # from the start of the data section

    @property
    def type_name(self) -> str:
        return GGML_TYPES[self.ggml_type][0] if self.ggml_type in GGML_TYPES else f"type{self.ggml_type}"

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def n_bytes(self) -> int:
        if self.ggml_type not in GGML_TYPES:
            raise GgufError(f"tensor {self.name}: unknown ggml type {self.ggml_type}")
        _, block, size = GGML_TYPES[self.ggml_type]
        if self.shape and self.shape[0] % block:
            raise GgufError(f"tensor {self.name}: row of {self.shape[0]} is not a whole number of blocks of {block}")
        return self.n_elements // block * size


@dataclass(frozen=True)
class GgufFile:
    path: Path
    version: int
    metadata: dict[str, Any]
    tensors: tuple[TensorInfo, ...]
    data_offset: int  # where tensor data starts in the file
    array_lengths: dict[str, int] = field(default_factory=dict)  # skipped arrays: key -> length

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", "llama"))

    @property
    def tensor_bytes(self) -> int:
        return sum(t.n_bytes for t in self.tensors)

    def arch_key(self, suffix: str, default: Any = None) -> Any:
        return self.metadata.get(f"{self.architecture}.{suffix}", default)

    @property
    def file_type(self) -> str:
        ftype = self.metadata.get("general.file_type")
        if isinstance(ftype, int) and ftype in FILE_TYPES:
            return FILE_TYPES[ftype]
        # No declared type: name it after the most common type among the 2-D weights.
        sizes: dict[str, int] = {}
        for t in self.tensors:
            if len(t.shape) >= 2:
                sizes[t.type_name] = sizes.get(t.type_name, 0) + t.n_bytes
        return max(sizes, key=lambda k: sizes[k]) if sizes else "F32"


class _Reader:
    def __init__(self, f: BinaryIO) -> None:
        self.f = f

    def read(self, n: int) -> bytes:
        data = self.f.read(n)
        if len(data) != n:
            raise GgufError("file ends inside the GGUF header")
        return data

    def scalar(self, fmt: str) -> Any:
        return struct.unpack(fmt, self.read(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        return self.read(self.scalar("<Q")).decode("utf-8", errors="replace")

    def skip_string(self) -> None:
        self.f.seek(self.scalar("<Q"), 1)

    def value(self, vtype: int) -> Any:
        if vtype in _SCALARS:
            return self.scalar(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        raise GgufError(f"unexpected metadata value type {vtype}")


def read_gguf(path: Path | str) -> GgufFile:
    path = Path(path)
    try:
        f = path.open("rb")
    except OSError as e:
        raise GgufError(f"cannot open {path}: {e}") from e
    with f:
        r = _Reader(f)
        if r.read(4) != GGUF_MAGIC:
            raise GgufError(f"{path} is not a GGUF file (no GGUF magic)")
        version = r.scalar("<I")
        if version not in (2, 3):
            raise GgufError(f"{path}: GGUF version {version} is not supported (2 and 3 are)")
        n_tensors, n_kv = r.scalar("<Q"), r.scalar("<Q")
        metadata: dict[str, Any] = {}
        lengths: dict[str, int] = {}
        for _ in range(n_kv):
            key, vtype = r.string(), r.scalar("<I")
            if vtype != _ARRAY:
                metadata[key] = r.value(vtype)
                continue
            item_type, count = r.scalar("<I"), r.scalar("<Q")
            lengths[key] = count
            if count <= _KEEP_ARRAY_MAX:
                metadata[key] = [r.value(item_type) for _ in range(count)]
            elif item_type == _STRING:
                for _ in range(count):
                    r.skip_string()
            elif item_type in _SCALARS:
                f.seek(count * struct.calcsize(_SCALARS[item_type]), 1)
            else:
                raise GgufError(f"{path}: nested array under {key!r} is not supported")
        tensors = []
        for _ in range(n_tensors):
            name = r.string()
            dims = tuple(r.scalar("<Q") for _ in range(r.scalar("<I")))
            tensors.append(TensorInfo(name, dims, r.scalar("<I"), r.scalar("<Q")))
        alignment = int(metadata.get("general.alignment", DEFAULT_ALIGNMENT))
        data_offset = -(-f.tell() // alignment) * alignment
    return GgufFile(path, version, metadata, tuple(tensors), data_offset, lengths)


def _is_expert(name: str) -> bool:
    return "_exps." in name  # ffn_{gate,up,down}_exps: all routed experts of a layer stacked in one tensor


def gguf_weights(g: GgufFile) -> GgufWeights:
    has_output = any(t.name == "output.weight" for t in g.tensors)
    dense = experts = embedding = 0
    for t in g.tensors:
        if _is_expert(t.name):
            experts += t.n_bytes
        elif t.name == "token_embd.weight" and has_output:
            embedding += t.n_bytes  # a lookup table: a step reads only the rows of its tokens
        else:
            dense += t.n_bytes  # tied embeddings are the output head: read whole every step
    return GgufWeights(dense, experts, embedding, dense + experts + embedding, g.file_type)


def model_from_gguf(path: Path | str) -> ModelSpec:
    """A ModelSpec with the file's exact weight bytes."""
    g = read_gguf(path)
    d_model = g.arch_key("embedding_length")
    n_layers = g.arch_key("block_count")
    n_heads = g.arch_key("attention.head_count")
    if not (d_model and n_layers and n_heads):
        raise GgufError(f"{g.path}: missing {g.architecture}.embedding_length/block_count/attention.head_count")
    n_kv = g.arch_key("attention.head_count_kv", n_heads)
    if isinstance(n_kv, list):  # per-layer counts (some hybrids): the largest bounds the cache
        n_kv = max(n_kv)
    embd = next((t for t in g.tensors if t.name == "token_embd.weight"), None)
    vocab = g.array_lengths.get("tokenizer.ggml.tokens") or (embd.shape[1] if embd else 0)
    d_ff = g.arch_key("feed_forward_length", 0)
    n_experts = int(g.arch_key("expert_count", 0) or 0)
    window = int(g.arch_key("attention.sliding_window", 0) or 0)
    kv_lora = int(g.arch_key("attention.kv_lora_rank", 0) or 0)
    return ModelSpec(
        name=str(g.metadata.get("general.name") or g.path.stem),
        n_layers=int(n_layers), d_model=int(d_model), n_heads=int(n_heads), n_kv_heads=int(n_kv),
        d_ff=int(d_ff if not isinstance(d_ff, list) else max(d_ff)), vocab=int(vocab),
        head_dim=int(g.arch_key("attention.key_length", 0) or 0) if not kv_lora else 0,
        tied_embeddings=not any(t.name == "output.weight" for t in g.tensors),
        context_length=int(g.arch_key("context_length", 4096)),
        n_experts=n_experts, n_experts_active=int(g.arch_key("expert_used_count", 0) or 0),
        d_ff_expert=int(g.arch_key("expert_feed_forward_length", 0) or d_ff or 0) if n_experts else 0,
        n_shared_experts=int(g.arch_key("expert_shared_count", 0) or 0),
        n_dense_layers=int(g.arch_key("leading_dense_block_count", 0) or 0),
        sliding_window=window, sliding_fraction=1.0 if window else 0.0,
        kv_lora_rank=kv_lora, qk_rope_head_dim=int(g.arch_key("rope.dimension_count", 0) or 0) if kv_lora else 0,
        source=f"gguf:{g.path.name}", gguf=gguf_weights(g),
    )

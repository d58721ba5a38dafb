"""Precisions: bytes a weight takes, which peak FLOPS a matmul runs at, and the default KV-cache width.

Serving precisions (bf16, fp8, fp4, int8, int4) and llama.cpp's GGUF types share one table. GGUF mixes
(Q4_K_M, ...) are averages over a whole file, measured from llama.cpp's published sizes for LLaMA-7B; a GGUF
file given to `qanat plan` is read exactly instead (see gguf.py).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Precision:
    name: str
    bits_per_weight: float  # including block scales
    compute: str  # the peak-FLOPS key matmuls run at: bf16, fp8, fp4, int8
    kv_bytes: float  # default KV-cache bytes per element
    is_gguf: bool = False  # llama.cpp block quantisation: weights are dequantised while streamed

    @property
    def bytes_per_weight(self) -> float:
        return self.bits_per_weight / 8


# llama.cpp `quantize --help` sizes for LLaMA-7B (6.74 B parameters), in GiB, turned into bits per weight.
_GGUF_7B_GIB = {
    "Q2_K": 2.63, "Q3_K_S": 2.75, "Q3_K_M": 3.07, "Q3_K_L": 3.35, "Q4_0": 3.56, "Q4_1": 3.90,
    "Q4_K_S": 3.59, "Q4_K_M": 3.80, "Q5_0": 4.33, "Q5_1": 4.70, "Q5_K_S": 4.33, "Q5_K_M": 4.45,
    "Q6_K": 5.15, "Q8_0": 6.70, "IQ4_XS": 3.43, "IQ4_NL": 3.56,
}
_LLAMA_7B_PARAMS = 6.74e9

PRECISIONS: dict[str, Precision] = {
    "fp32": Precision("fp32", 32, "fp32", 4),
    "bf16": Precision("bf16", 16, "bf16", 2),
    "fp16": Precision("fp16", 16, "bf16", 2),
    "fp8": Precision("fp8", 8.03, "fp8", 1),  # per-tensor or per-channel scales: negligible
    "fp4": Precision("fp4", 4.5, "fp4", 1),  # NVFP4: 4-bit values + one fp8 scale per 16
    "int8": Precision("int8", 8.03, "int8", 2),
    "int4": Precision("int4", 4.25, "bf16", 2),  # AWQ/GPTQ, group 128: weights-only, matmuls in 16-bit
    "F16": Precision("F16", 16, "bf16", 2, is_gguf=True),
    "BF16": Precision("BF16", 16, "bf16", 2, is_gguf=True),
    "F32": Precision("F32", 32, "fp32", 2, is_gguf=True),
}
for _name, _gib in _GGUF_7B_GIB.items():
    # llama.cpp multiplies quantised blocks with int8 dot products (CPU VNNI/SDOT, CUDA MMQ).
    PRECISIONS[_name] = Precision(_name, _gib * 2**30 * 8 / _LLAMA_7B_PARAMS, "int8", 2, is_gguf=True)

# Where a chip lacks a compute type, the next wider one it has.
COMPUTE_FALLBACK = {"fp4": ("fp4", "fp8", "bf16"), "fp8": ("fp8", "bf16"), "int8": ("int8", "bf16"),
                    "bf16": ("bf16", "fp32"), "fp32": ("fp32", "bf16")}

KV_DTYPE_BYTES = {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0, "fp8": 1.0, "int8": 1.0, "q8_0": 34 / 32, "q4_0": 18 / 32}


def get_precision(name: str) -> Precision:
    key = name if name in PRECISIONS else name.upper() if name.upper() in PRECISIONS else name.lower()
    if key not in PRECISIONS:
        raise ValueError(f"unknown precision {name!r}; one of: {', '.join(PRECISIONS)}")
    return PRECISIONS[key]


def gguf_precision(name: str, bits_per_weight: float) -> Precision:
    """A GGUF file's own precision, with the exact bits per weight read from its tensor table."""
    base = PRECISIONS.get(name.upper())
    compute = base.compute if base else "int8"
    return Precision(name.upper(), bits_per_weight, compute, 2, is_gguf=True)

"""Chips: peak dense FLOPS per precision, memory, bandwidth, power, interconnect and price, with sources.

All figures are per chip (one GPU, one TPU chip, one LPU, one wafer, one CPU socket) and dense (no 2:4
sparsity). Where a vendor publishes no figure (idle power, price) the field is None and the planner says
it used a class default. `this-machine` is read from the host at run time.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

T, G = 1e12, 1e9

CHIP_CLASSES = ("gpu-hbm", "gpu-gddr", "tpu", "neuron", "asic-hbm", "sram-dataflow", "wafer-scale",
                "cpu-server", "cpu-edge", "apple-soc", "cpu-host")


@dataclass(frozen=True)
class ChipSpec:
    name: str
    chip_class: str
    peak_flops: dict[str, float]  # dense FLOP/s by compute type: bf16, fp8, fp4, int8, fp32
    memory_bytes: float  # capacity the model and cache live in (HBM, GDDR, DRAM, or on-chip SRAM)
    memory_bw: float  # bytes/s to that memory
    tdp_w: float
    interconnect_bw: float = 0.0  # bytes/s per chip to its peers (one direction), 0 = none
    idle_w: float | None = None
    price_per_hour: float | None = None  # US$ per chip-hour, public on-demand rate where there is one
    price_note: str = ""
    sram_is_memory: bool = False  # weights live in on-chip SRAM (Groq, Cerebras): capacity is the limit
    vendor: str = ""
    sources: tuple[str, ...] = ()
    notes: str = ""
    aliases: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        if self.chip_class not in CHIP_CLASSES:
            raise ValueError(f"chip {self.name!r}: class must be one of {', '.join(CHIP_CLASSES)}")
        if self.memory_bytes <= 0 or self.memory_bw <= 0 or self.tdp_w <= 0 or not self.peak_flops:
            raise ValueError(f"chip {self.name!r}: memory, bandwidth, TDP and at least one peak FLOPS are required")

    def flops(self, compute: str) -> tuple[float, str]:
        """Peak dense FLOP/s for `compute`, falling back to the next wider type the chip has."""
        from qanat.planner.precision import COMPUTE_FALLBACK

        for key in COMPUTE_FALLBACK.get(compute, (compute,)) + ("bf16", "fp32", "int8"):
            if key in self.peak_flops:
                return self.peak_flops[key], key
        key = next(iter(self.peak_flops))
        return self.peak_flops[key], key


_NV = "https://www.nvidia.com/en-us/data-center/"
_LAMBDA = "Lambda Cloud on-demand list price (lambda.ai/pricing, 2025); rates move"

BUILTIN_CHIPS: tuple[ChipSpec, ...] = (
    ChipSpec("H100-SXM", "gpu-hbm", {"bf16": 989.4 * T, "fp8": 1978.9 * T, "int8": 1978.9 * T, "fp32": 66.9 * T},
             80e9, 3.35e12, 700, interconnect_bw=450e9, idle_w=75, price_per_hour=2.99, price_note=_LAMBDA,
             vendor="NVIDIA", sources=(_NV + "h100/", "NVIDIA H100 Tensor Core GPU datasheet (SXM5)"),
             aliases=("h100", "h100-sxm5")),
    ChipSpec("H200", "gpu-hbm", {"bf16": 989.4 * T, "fp8": 1978.9 * T, "int8": 1978.9 * T, "fp32": 66.9 * T},
             141e9, 4.8e12, 700, interconnect_bw=450e9, idle_w=75, price_per_hour=None,
             vendor="NVIDIA", sources=(_NV + "h200/", "NVIDIA H200 datasheet (SXM)"), aliases=("h200-sxm",)),
    ChipSpec("B200", "gpu-hbm", {"bf16": 2250 * T, "fp8": 4500 * T, "fp4": 9000 * T, "int8": 4500 * T, "fp32": 75 * T},
             180e9, 8.0e12, 1000, interconnect_bw=900e9, idle_w=140, price_per_hour=4.99, price_note=_LAMBDA,
             vendor="NVIDIA", sources=(_NV + "dgx-b200/", "NVIDIA DGX B200 datasheet (per GPU: 1/8 of the system)"),
             aliases=("b200-sxm",)),
    ChipSpec("A100-80GB", "gpu-hbm", {"bf16": 312 * T, "int8": 624 * T, "fp32": 19.5 * T},
             80e9, 2.039e12, 400, interconnect_bw=300e9, idle_w=55, price_per_hour=1.79, price_note=_LAMBDA,
             vendor="NVIDIA", sources=(_NV + "a100/", "NVIDIA A100 datasheet (80GB SXM)"), aliases=("a100",)),
    ChipSpec("L4", "gpu-gddr", {"bf16": 121 * T, "fp8": 242.5 * T, "int8": 242.5 * T, "fp32": 30.3 * T},
             24e9, 300e9, 72, interconnect_bw=32e9, idle_w=16, price_per_hour=0.71,
             price_note="Google Cloud g2-standard-4 on-demand, us-central1 (1 L4 with its VM)",
             vendor="NVIDIA", sources=(_NV + "l4/", "NVIDIA L4 datasheet")),
    ChipSpec("L40S", "gpu-gddr", {"bf16": 362.05 * T, "fp8": 733 * T, "int8": 733 * T, "fp32": 91.6 * T},
             48e9, 864e9, 350, interconnect_bw=32e9, idle_w=35, price_per_hour=None,
             vendor="NVIDIA", sources=(_NV + "l40s/", "NVIDIA L40S datasheet")),
    ChipSpec("MI300X", "gpu-hbm", {"bf16": 1307.4 * T, "fp8": 2614.9 * T, "int8": 2614.9 * T, "fp32": 163.4 * T},
             192e9, 5.3e12, 750, interconnect_bw=448e9, idle_w=140, price_per_hour=None,
             vendor="AMD", sources=("https://www.amd.com/en/products/accelerators/instinct/mi300/mi300x.html",
                                    "AMD Instinct MI300X datasheet")),
    ChipSpec("TPU-v5e", "tpu", {"bf16": 197 * T, "int8": 394 * T}, 16e9, 819e9, 200,
             interconnect_bw=200e9, price_per_hour=1.20, price_note="Google Cloud TPU v5e on-demand per chip-hour",
             vendor="Google", sources=("https://cloud.google.com/tpu/docs/v5e", "https://cloud.google.com/tpu/pricing"),
             notes="Google publishes no TDP: 200 W is an estimate", aliases=("v5e", "tpu-v5-lite")),
    ChipSpec("TPU-v6e", "tpu", {"bf16": 918 * T, "int8": 1836 * T}, 32e9, 1640e9, 300,
             interconnect_bw=448e9, price_per_hour=2.70, price_note="Google Cloud TPU v6e on-demand per chip-hour",
             vendor="Google", sources=("https://cloud.google.com/tpu/docs/v6e", "https://cloud.google.com/tpu/pricing"),
             notes="Trillium; Google publishes no TDP: 300 W is an estimate", aliases=("v6e", "trillium")),
    ChipSpec("Trainium2", "neuron", {"bf16": 667 * T, "fp8": 1299 * T, "int8": 1299 * T}, 96e9, 2.9e12, 500,
             interconnect_bw=640e9, price_per_hour=None, vendor="AWS",
             sources=("https://aws.amazon.com/ai/machine-learning/trainium/",
                      "https://awsdocs-neuron.readthedocs-hosted.com/en/latest/about-neuron/arch/neuron-hardware/trainium2.html"),
             notes="AWS publishes no TDP: 500 W is an estimate", aliases=("trn2",)),
    ChipSpec("Inferentia2", "neuron", {"bf16": 190 * T, "fp8": 190 * T, "int8": 380 * T}, 32e9, 820e9, 130,
             interconnect_bw=96e9, price_per_hour=0.76, price_note="AWS inf2.xlarge on-demand (1 chip), us-east-1",
             vendor="AWS", sources=("https://aws.amazon.com/ec2/instance-types/inf2/",
                                    "https://awsdocs-neuron.readthedocs-hosted.com/en/latest/about-neuron/arch/neuron-hardware/inferentia2.html"),
             notes="AWS publishes no TDP: 130 W is an estimate", aliases=("inf2",)),
    ChipSpec("Maia-100", "asic-hbm", {"bf16": 800 * T, "int8": 1600 * T, "fp8": 1600 * T}, 64e9, 1.8e12, 500,
             interconnect_bw=600e9, vendor="Microsoft",
             sources=("Microsoft, 'Inside Maia 100', Hot Chips 2024",
                      "https://techcommunity.microsoft.com/blog/azureinfrastructureblog/inside-maia-100-revolutionizing-ai-workloads-with-microsoft%E2%80%99s-custom-ai-accelerator/4229118"),
             notes="500 W provisioned (700 W design); not sold, no price; MX formats counted as fp8/int8"),
    ChipSpec("Groq-LPU", "sram-dataflow", {"bf16": 188 * T, "int8": 750 * T, "fp8": 750 * T}, 230e6, 80e12, 300,
             interconnect_bw=330e9, sram_is_memory=True, vendor="Groq",
             sources=("https://groq.com/wp-content/uploads/2024/02/GroqChip-Product-Brief.pdf",
                      "https://www.techpowerup.com/319286/groq-lpu-ai-inference-chip-is-rivaling-major-players"),
             notes="230 MB on-chip SRAM per chip: large models span hundreds of chips; no chip-hour price",
             aliases=("groq", "lpu")),
    ChipSpec("Cerebras-WSE-3", "wafer-scale", {"bf16": 125000 * T / 8, "fp8": 125000 * T / 4}, 44e9, 21e15, 23000,
             interconnect_bw=150e9, sram_is_memory=True, vendor="Cerebras",
             sources=("https://www.cerebras.ai/product-chip/", "Cerebras CS-3 datasheet (23 kW system)"),
             notes="125 PF is Cerebras' sparse 'AI compute' figure; dense bf16 taken as 1/8 of it. Power is the "
                   "CS-3 system's", aliases=("cerebras", "wse-3", "cs-3")),
    ChipSpec("EPYC-9654", "cpu-server", {"fp32": 7.37 * T, "bf16": 14.7 * T, "int8": 29.5 * T}, 384e9, 460.8e9, 360,
             idle_w=110, vendor="AMD",
             sources=("https://www.amd.com/en/products/processors/server/epyc/4th-generation-9004-and-8004-series/amd-epyc-9654.html",),
             notes="96 Zen 4 cores at 2.4 GHz, AVX-512 on 2x256-bit FMA pipes: 32 fp32 FLOP/cycle/core; "
                   "12 channels DDR5-4800; 384 GB (12 x 32 GB) assumed", aliases=("epyc", "genoa")),
    ChipSpec("M2-Ultra", "apple-soc", {"bf16": 27.2 * T, "fp32": 27.2 * T, "int8": 27.2 * T}, 192e9, 800e9, 295,
             idle_w=11, vendor="Apple",
             sources=("https://www.apple.com/newsroom/2023/06/apple-introduces-m2-ultra/",
                      "https://support.apple.com/en-us/102027 (Mac Studio power: 11 W idle, 295 W max)"),
             notes="76-core GPU; 27.2 TFLOPS fp32 is the commonly cited GPU figure (Apple publishes none); "
                   "power is the whole Mac Studio's", aliases=("m2ultra", "mac-studio")),
    ChipSpec("RaspberryPi-5", "cpu-edge", {"fp32": 153.6 * G, "bf16": 307.2 * G, "int8": 614.4 * G}, 8e9, 17.1e9, 12,
             idle_w=2.7, vendor="Raspberry Pi",
             sources=("https://datasheets.raspberrypi.com/rpi5/raspberry-pi-5-product-brief.pdf",),
             notes="4x Cortex-A76 at 2.4 GHz, 2x128-bit NEON FMA (16 fp32 FLOP/cycle/core); LPDDR4X-4267 on a "
                   "32-bit bus; 8 GB board; 12 W is the loaded board, not the 27 W supply", aliases=("pi5", "rpi5")),
)


# ---- this machine --------------------------------------------------------------------------------------
def _cpuinfo() -> tuple[str, set[str], float]:
    model, mhz = "unknown", 0.0
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "model name" and model == "unknown":
                model = value.strip()
            elif key in ("flags", "Features") and not flags:
                flags = set(value.split())
            elif key == "cpu MHz" and not mhz:
                mhz = float(value)
    except (OSError, ValueError):
        pass
    return model, flags, mhz


def _mem_total_bytes() -> float:
    try:
        match = re.search(r"MemTotal:\s+(\d+) kB", Path("/proc/meminfo").read_text())
        return float(match[1]) * 1024 if match else 8e9
    except OSError:
        return 8e9


def _stream_bandwidth() -> float:
    """Bytes/s for a 64 MiB numpy copy (read + write), best of 3: about 0.1 s. One thread, so a floor."""
    import numpy as np

    src = np.ones(8 * 2**20)  # 64 MiB of float64
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - start)
    return 2 * src.nbytes / best


def this_machine(threads: int | None = None) -> ChipSpec:
    """The host's CPU as one chip: cores from the OS, FLOPS from /proc/cpuinfo's flags and clock, DRAM
    bandwidth from a short copy probe, power from qanat's CPU TDP table (as `qanat serve`'s energy estimate)."""
    from qanat.energy.meters import CpuTimeEstimateMeter

    model, flags, mhz = _cpuinfo()
    cores = threads or os.cpu_count() or 1
    ghz = (mhz or 2000.0) / 1000
    # FLOP/cycle/core: two FMA pipes of the widest vector unit (fp32 lanes x 2 for the multiply-add).
    fp32_per_cycle = 64 if "avx512f" in flags else 32 if "avx2" in flags else 16
    fp32 = cores * ghz * 1e9 * fp32_per_cycle
    int8 = fp32 * (4 if {"avx512_vnni", "avx_vnni", "asimddp"} & flags else 2)
    bf16 = fp32 * (2 if {"avx512_bf16", "bf16", "amx_bf16"} & flags else 1)
    meter = CpuTimeEstimateMeter()
    watts = meter.watts_per_busy_core * cores
    return ChipSpec(
        "this-machine", "cpu-host", {"fp32": fp32, "bf16": bf16, "int8": int8}, _mem_total_bytes(),
        _stream_bandwidth(), watts, idle_w=meter.idle_w, vendor=model,
        sources=("/proc/cpuinfo (model, flags, clock)", "/proc/meminfo", "numpy copy probe (bandwidth)",
                 f"qanat.energy CPU TDP table: {meter.tdp_w:.0f} W / {meter.package_cores} cores"),
        notes=f"{model}, {cores} cores counted", aliases=("this", "host", "local"),
    )


def with_overrides(chip: ChipSpec, **changes: object) -> ChipSpec:
    return replace(chip, **{k: v for k, v in changes.items() if v is not None})  # type: ignore[arg-type]

"""Energy meters: cumulative joules from a hardware counter where one is readable, an estimate otherwise.

Every meter answers `read_joules()`: joules since the meter was opened, never decreasing. Its `source`
label says where the number comes from and travels with it everywhere (API, metrics, bench):
`measured:nvml`, `measured:rapl`, or `estimated:cpu-time`.
"""

from __future__ import annotations

import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

POWERCAP_ROOT = Path("/sys/class/powercap")
METER_KINDS = ("auto", "nvml", "rapl", "estimate")  # what --energy-meter accepts

# (substring of /proc/cpuinfo's "model name", package TDP in watts, cores per package), first match wins.
# Typical mid-range parts of each family; a VM's cpuinfo shows its vCPUs, not the package, so the core
# count comes from here. Override the TDP with --cpu-tdp-w.
CPU_TDP = [
    ("EPYC", 225.0, 64),  # AMD EPYC 7003/9004: 155-400 W, 16-96 cores
    ("Xeon", 205.0, 28),  # Intel Xeon Scalable: 150-350 W
    ("Ryzen", 105.0, 16),
    ("Core(TM) i9", 125.0, 24),
    ("Core(TM) i7", 65.0, 8),
    ("Core(TM) i5", 65.0, 6),
    ("Apple", 30.0, 10),
]
DEFAULT_CPU_TDP = (65.0, 8)  # a desktop part
IDLE_FRACTION_OF_TDP = 0.3  # idle package power as a share of TDP, for the estimate's separate idle figure


class EnergyMeter(Protocol):
    source: str

    def read_joules(self) -> float: ...


class RaplMeter:
    """CPU packages through Linux powercap (Intel RAPL; AMD exposes the same tree).

    Each package's `energy_uj` counter wraps at `max_energy_range_uj`; a reading lower than the last one
    means it wrapped once (we read far more often than the minutes a wrap takes).
    """

    source = "measured:rapl"

    def __init__(self, root: Path = POWERCAP_ROOT) -> None:
        # Package domains only (intel-rapl:0, intel-rapl:1): their sub-domains (intel-rapl:0:0) are inside them.
        self.zones = sorted(p for p in root.glob("*-rapl:*") if re.fullmatch(r"[a-z]+-rapl:\d+", p.name))
        if not self.zones:
            raise OSError(f"no RAPL package zones under {root}")
        self._max_uj = [int((z / "max_energy_range_uj").read_text()) for z in self.zones]
        self._last_uj = [self._read_uj(z) for z in self.zones]
        self._total_uj = 0
        self._lock = threading.Lock()

    @staticmethod
    def _read_uj(zone: Path) -> int:
        return int((zone / "energy_uj").read_text())

    def read_joules(self) -> float:
        with self._lock:
            for i, zone in enumerate(self.zones):
                now = self._read_uj(zone)
                last = self._last_uj[i]
                self._total_uj += now - last if now >= last else now + self._max_uj[i] - last
                self._last_uj[i] = now
            return self._total_uj / 1e6


class NvmlMeter:
    """NVIDIA GPUs through NVML's total-energy counter (millijoules since the driver loaded), all devices."""

    source = "measured:nvml"

    def __init__(self, nvml: Any = None) -> None:
        if nvml is None:
            import pynvml  # from nvidia-ml-py; imported here so machines without it still start

            nvml = pynvml
        self._nvml = nvml
        nvml.nvmlInit()
        count = nvml.nvmlDeviceGetCount()
        if count == 0:
            raise OSError("NVML sees no GPU")
        self._handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
        self._start_mj = self._total_mj()
        self._lock = threading.Lock()

    def _total_mj(self) -> int:
        return sum(self._nvml.nvmlDeviceGetTotalEnergyConsumption(h) for h in self._handles)

    def read_joules(self) -> float:
        with self._lock:
            return (self._total_mj() - self._start_mj) / 1000


class CpuTimeEstimateMeter:
    """No counter readable: this process's CPU time × watts per busy core, from the package TDP.

    That is busy power only; idle power, `idle_w` (our cores' share of the package's idle draw), is reported
    separately and charged to nobody.
    """

    source = "estimated:cpu-time"

    def __init__(self, tdp_w: float | None = None, cores: int | None = None) -> None:
        self.cpu_model = cpu_model()
        table_tdp_w, table_cores = _tdp_for(self.cpu_model)
        self.tdp_w = tdp_w if tdp_w is not None else table_tdp_w
        # A package's TDP is spread over all of its cores; a VM or container owns only some of them.
        self.package_cores = cores or table_cores
        self.watts_per_busy_core = self.tdp_w / self.package_cores
        self.idle_w = IDLE_FRACTION_OF_TDP * self.watts_per_busy_core * min(os.cpu_count() or 1, self.package_cores)
        self._start_cpu_s = time.process_time()

    def read_joules(self) -> float:
        return (time.process_time() - self._start_cpu_s) * self.watts_per_busy_core


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, or "unknown"."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def _tdp_for(cpu_model: str) -> tuple[float, int]:
    return next(((w, cores) for key, w, cores in CPU_TDP if key in cpu_model), DEFAULT_CPU_TDP)


@dataclass(frozen=True)
class MeterProbe:
    name: str
    source: str
    readable: bool
    detail: str


def probe_meters(powercap_root: Path = POWERCAP_ROOT) -> list[MeterProbe]:
    """Which meters exist here and whether they can be read (for `qanat energy`)."""
    probes = []
    try:
        NvmlMeter()
        probes.append(MeterProbe("nvml", NvmlMeter.source, True, "NVIDIA GPU energy counter"))
    except Exception as e:  # no module, no driver, no GPU: each is a plain "not readable"
        probes.append(MeterProbe("nvml", NvmlMeter.source, False, f"{type(e).__name__}: {e}"))
    try:
        meter = RaplMeter(powercap_root)
        probes.append(MeterProbe("rapl", RaplMeter.source, True, ", ".join(z.name for z in meter.zones)))
    except (OSError, ValueError) as e:
        probes.append(MeterProbe("rapl", RaplMeter.source, False, f"{type(e).__name__}: {e}"))
    estimate = CpuTimeEstimateMeter()
    probes.append(MeterProbe(
        "estimate", estimate.source, True,
        f"{estimate.cpu_model}: {estimate.tdp_w:.0f} W TDP / {estimate.package_cores} cores = "
        f"{estimate.watts_per_busy_core:.2f} W per busy core; idle {estimate.idle_w:.1f} W not charged",
    ))
    return probes


def open_meter(kind: str = "auto", tdp_w: float | None = None, powercap_root: Path = POWERCAP_ROOT) -> EnergyMeter:
    """`auto` takes the first readable of NVML, RAPL, then the CPU-time estimate."""
    if kind in ("auto", "nvml"):
        try:
            return NvmlMeter()
        except Exception:
            if kind == "nvml":
                raise
    if kind in ("auto", "rapl"):
        try:
            return RaplMeter(powercap_root)
        except (OSError, ValueError):
            if kind == "rapl":
                raise
    if kind in ("auto", "estimate"):
        return CpuTimeEstimateMeter(tdp_w)
    raise ValueError(f"--energy-meter must be one of {', '.join(METER_KINDS)}, got {kind!r}")

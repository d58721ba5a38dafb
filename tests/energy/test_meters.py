"""Energy meters and attribution: a temporary powercap tree, a stand-in NVML module, the estimate's labels."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from qanat.energy.accounting import EnergyAccountant
from qanat.energy.carbon import CarbonModel
from qanat.energy.meters import CpuTimeEstimateMeter, NvmlMeter, RaplMeter, open_meter, probe_meters


def make_zone(root: Path, name: str, energy_uj: int, max_uj: int) -> Path:
    zone = root / name
    zone.mkdir(parents=True)
    (zone / "energy_uj").write_text(f"{energy_uj}\n")
    (zone / "max_energy_range_uj").write_text(f"{max_uj}\n")
    return zone


def set_energy(zone: Path, energy_uj: int) -> None:
    (zone / "energy_uj").write_text(f"{energy_uj}\n")


def test_rapl_reads_exact_joules_across_packages_and_wrap_around(tmp_path: Path) -> None:
    pkg0 = make_zone(tmp_path, "intel-rapl:0", 1_000_000, max_uj=10_000_000)
    pkg1 = make_zone(tmp_path, "intel-rapl:1", 9_500_000, max_uj=10_000_000)
    make_zone(tmp_path, "intel-rapl:0:0", 123, max_uj=10_000_000)  # a sub-domain (core), inside package 0
    meter = RaplMeter(tmp_path)
    assert [z.name for z in meter.zones] == ["intel-rapl:0", "intel-rapl:1"]
    assert meter.read_joules() == 0.0
    set_energy(pkg0, 3_500_000)  # +2.5 J
    set_energy(pkg1, 500_000)  # wrapped: +0.5 J to the top, +0.5 J after = 1.0 J
    assert meter.read_joules() == pytest.approx(3.5)
    set_energy(pkg0, 4_000_000)  # +0.5 J
    assert meter.read_joules() == pytest.approx(4.0)
    assert meter.source == "measured:rapl"


def test_rapl_without_zones_is_not_readable(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        RaplMeter(tmp_path)
    assert open_meter("auto", powercap_root=tmp_path).source.startswith(("measured:nvml", "estimated:"))


def test_auto_picks_rapl_when_readable(tmp_path: Path) -> None:
    make_zone(tmp_path, "intel-rapl:0", 0, max_uj=1 << 32)
    meter = open_meter("rapl", powercap_root=tmp_path)
    assert meter.source == "measured:rapl"


class FakeNvml:
    """Stand-in for pynvml: no GPU exists on these machines. Energy in millijoules per device."""

    def __init__(self, energies_mj: list[int]) -> None:
        self.energies_mj = energies_mj

    def nvmlInit(self) -> None:  # noqa: N802 (NVML's names)
        pass

    def nvmlDeviceGetCount(self) -> int:  # noqa: N802
        return len(self.energies_mj)

    def nvmlDeviceGetHandleByIndex(self, i: int) -> SimpleNamespace:  # noqa: N802
        return SimpleNamespace(index=i)

    def nvmlDeviceGetTotalEnergyConsumption(self, handle: SimpleNamespace) -> int:  # noqa: N802
        return self.energies_mj[handle.index]


def test_nvml_sums_devices_from_the_start() -> None:
    fake = FakeNvml([5_000, 7_000])
    meter = NvmlMeter(fake)
    assert meter.read_joules() == 0.0
    fake.energies_mj = [6_500, 9_000]
    assert meter.read_joules() == pytest.approx(3.5)
    assert meter.source == "measured:nvml"
    with pytest.raises(OSError, match="no GPU"):
        NvmlMeter(FakeNvml([]))


def test_estimate_is_labelled_and_grows_with_cpu_time() -> None:
    meter = CpuTimeEstimateMeter(tdp_w=64.0, cores=8)
    assert meter.source == "estimated:cpu-time" and meter.watts_per_busy_core == 8.0
    sum(i * i for i in range(2_000_000))  # burn some CPU
    assert meter.read_joules() > 0
    probes = {p.name: p for p in probe_meters(Path("/nonexistent"))}
    assert probes["estimate"].readable and probes["estimate"].source == "estimated:cpu-time"
    assert not probes["rapl"].readable


def test_attribution_balances_across_concurrent_requests_of_different_sizes() -> None:
    accountant = EnergyAccountant("measured:test")
    charged: dict[str, float] = {}
    # (idle joules before the step, step joules, tokens per request in the step)
    steps = [(0.5, 3.0, {"a": 200, "b": 56}), (0.0, 1.0, {"a": 1, "b": 1, "c": 120}), (2.0, 0.7, {"c": 1}),
             (0.3, 0.0, {})]
    for idle_j, step_j, work in steps:
        for request_id, joules in accountant.record(idle_j, step_j, work).items():
            charged[request_id] = charged.get(request_id, 0.0) + joules
    totals = accountant.totals()
    assert charged["a"] == pytest.approx(3.0 * 200 / 256 + 1.0 / 122)
    assert charged["c"] == pytest.approx(1.0 * 120 / 122 + 0.7)
    assert totals.idle_j == pytest.approx(2.8)
    assert sum(charged.values()) + totals.idle_j == pytest.approx(totals.total_j)
    assert totals.total_j == pytest.approx(sum(idle + step for idle, step, _ in steps))
    assert totals.tokens == 256 + 122 + 1


def test_carbon_grid_table_and_errors() -> None:
    assert CarbonModel.for_grid("fr").grams(3.6e6) == pytest.approx(56.0)
    assert CarbonModel.for_grid("MA", pue=1.5).grams(3.6e6) == pytest.approx(580.0 * 1.5)
    assert CarbonModel.for_grid("XX", intensity_g_per_kwh=100).grams(3.6e6) == pytest.approx(100.0)
    with pytest.raises(ValueError, match="--grid"):
        CarbonModel.for_grid("XX")

"""Power between idle and saturation, driven by what the step keeps busy.

P = idle + (TDP - idle) * min(1, floor + a_mem * memory_busy + a_compute * compute_busy)

A memory-bound decode keeps the memory system busy but the tensor cores mostly idle, so it draws well under
TDP (a B200 serving an 8B model stays under ~70 % of its TDP); overhead-bound steps (small batches, host
work) leave both idle and draw little above idle. Calibration fits idle, a_mem and a_compute from measured watts.
"""

from __future__ import annotations

from dataclasses import dataclass

from qanat.planner.chips import ChipSpec
from qanat.planner.efficiency import Efficiency
from qanat.planner.step import StepTime


@dataclass(frozen=True)
class PowerCurve:
    idle_w: float
    tdp_w: float
    a_mem: float
    a_compute: float
    floor: float = 0.0

    def watts(self, memory_busy: float, compute_busy: float) -> float:
        load = min(1.0, self.floor + self.a_mem * memory_busy + self.a_compute * compute_busy)
        return self.idle_w + (self.tdp_w - self.idle_w) * load

    def at(self, step: StepTime) -> float:
        return self.watts(step.memory_busy, step.compute_busy)


def power_curve(chip: ChipSpec, eff: Efficiency) -> PowerCurve:
    idle = eff.idle_w if eff.idle_w is not None else (
        chip.idle_w if chip.idle_w is not None else eff.idle_frac * chip.tdp_w)
    return PowerCurve(idle, chip.tdp_w, eff.power_mem, eff.power_compute, eff.power_floor)

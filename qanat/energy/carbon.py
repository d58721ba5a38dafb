"""Grams of CO2 from joules: grid carbon intensity (gCO2e per kWh) × PUE.

Built-in intensities are yearly averages of electricity generation, rounded:
- FR 56: Ember, France 2023 (nuclear and hydro).
- WORLD 481: Ember, Global Electricity Review 2024 (2023 world average).
- MA 580: Morocco, midpoint of the 550-610 range reported by Ember and Our World in Data for 2022-2023
  (coal-heavy generation).
- US 367: U.S. EIA, 2023 (0.81 lb CO2/kWh at the plant).
"""

from __future__ import annotations

from dataclasses import dataclass

GRID_INTENSITY_G_PER_KWH = {"FR": 56.0, "WORLD": 481.0, "MA": 580.0, "US": 367.0}
JOULES_PER_KWH = 3.6e6


@dataclass(frozen=True)
class CarbonModel:
    grid: str = "WORLD"
    intensity_g_per_kwh: float = GRID_INTENSITY_G_PER_KWH["WORLD"]
    pue: float = 1.0  # data-centre overhead; 1.0 for an edge box

    @classmethod
    def for_grid(cls, grid: str, pue: float = 1.0, intensity_g_per_kwh: float | None = None) -> CarbonModel:
        code = grid.upper()
        if intensity_g_per_kwh is None:
            if code not in GRID_INTENSITY_G_PER_KWH:
                known = ", ".join(sorted(GRID_INTENSITY_G_PER_KWH))
                raise ValueError(f"--grid must be one of {known} (or give --grid-intensity), got {grid!r}")
            intensity_g_per_kwh = GRID_INTENSITY_G_PER_KWH[code]
        if intensity_g_per_kwh < 0 or pue < 1.0:
            raise ValueError(f"grid intensity must be >= 0 and PUE >= 1, got {intensity_g_per_kwh} and {pue}")
        return cls(code, intensity_g_per_kwh, pue)

    def grams(self, joules: float) -> float:
        return joules / JOULES_PER_KWH * self.pue * self.intensity_g_per_kwh

"""Per-request energy attribution: each step's energy is shared by the requests in it, in proportion to the
tokens each got; energy between steps is idle, reported but charged to nobody.

The books balance: what `end_step` hands out + idle = meter total since the accountant opened.
Engine thread only.
"""

from __future__ import annotations

from dataclasses import dataclass

from qanat.energy.meters import EnergyMeter


@dataclass(frozen=True)
class EnergyTotals:
    source: str
    total_j: float  # meter reading since the accountant opened
    attributed_j: float  # charged to requests
    idle_j: float  # between steps
    tokens: int  # tokens (prompt + generated) the attributed energy paid for


class EnergyAccountant:
    def __init__(self, meter: EnergyMeter) -> None:
        self.meter = meter
        self.source = meter.source
        self._origin_j = meter.read_joules()
        self._last_j = self._origin_j
        self._step_start_j = self._origin_j
        self.attributed_j = 0.0
        self.idle_j = 0.0
        self.tokens = 0

    def begin_step(self) -> None:
        now = self.meter.read_joules()
        self.idle_j += now - self._last_j
        self._step_start_j = self._last_j = now

    def end_step(self, tokens_by_request: dict[str, int]) -> dict[str, float]:
        """Joules of this step for each request, in proportion to its tokens (prompt chunk or decode)."""
        now = self.meter.read_joules()
        step_j = now - self._step_start_j
        self._last_j = now
        total_tokens = sum(tokens_by_request.values())
        if total_tokens == 0:
            self.idle_j += step_j
            return {}
        self.attributed_j += step_j
        self.tokens += total_tokens
        return {request_id: step_j * n / total_tokens for request_id, n in tokens_by_request.items()}

    def totals(self) -> EnergyTotals:
        return EnergyTotals(self.source, self._last_j - self._origin_j, self.attributed_j, self.idle_j, self.tokens)

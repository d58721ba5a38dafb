"""Per-request energy attribution: each step's energy is shared by the requests in it, in proportion to the
tokens each got; energy between steps is idle, reported but charged to nobody.

The books balance: what `record` hands out + idle = meter total over the steps booked. Engine thread only.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EnergyTotals:
    source: str
    total_j: float  # everything the meter counted over the booked steps
    attributed_j: float  # charged to requests
    idle_j: float  # between steps
    tokens: int  # tokens (prompt + generated) the attributed energy paid for


class EnergyAccountant:
    """Books of one engine. The meter is read where the work runs (the executor's process) and each step's
    readings arrive here as joules, so the books survive an executor restart: a new meter only adds on."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.attributed_j = 0.0
        self.idle_j = 0.0
        self.tokens = 0

    def record(self, idle_j: float, step_j: float, tokens_by_request: dict[str, int]) -> dict[str, float]:
        """Book one step: the idle joules before it, then its own, shared in proportion to tokens (a 200-token
        prompt chunk pays 200x what a decode token pays). Returns each request's share."""
        self.idle_j += idle_j
        total_tokens = sum(tokens_by_request.values())
        if total_tokens == 0:
            self.idle_j += step_j
            return {}
        self.attributed_j += step_j
        self.tokens += total_tokens
        return {request_id: step_j * n / total_tokens for request_id, n in tokens_by_request.items()}

    def totals(self) -> EnergyTotals:
        return EnergyTotals(self.source, self.attributed_j + self.idle_j, self.attributed_j, self.idle_j, self.tokens)

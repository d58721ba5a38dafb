"""Aggregates over request records. Field names follow `vllm bench serve` (ms, *_ttft_ms, request_goodput)."""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from qanat.bench.loadgen import RequestRecord

_SLO_UNITS = {"ms": 1e-3, "s": 1.0}


@dataclass(frozen=True)
class Slo:
    """Service-level objectives in seconds; a request meets the SLO when it meets every one that is set."""

    ttft_s: float | None = None
    tpot_s: float | None = None
    e2e_s: float | None = None

    @classmethod
    def parse(cls, text: str) -> Slo:
        """`ttft=500ms,tpot=50ms,e2e=10s`."""
        values: dict[str, float] = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            match = re.fullmatch(r"(ttft|tpot|e2e)=(\d+(?:\.\d+)?)(ms|s)", part)
            if not match:
                raise ValueError(f"bad SLO {part!r}: expected NAME=NUMBER(ms|s) with NAME in ttft, tpot, e2e")
            values[f"{match[1]}_s"] = float(match[2]) * _SLO_UNITS[match[3]]
        return cls(**values)

    def met_by(self, r: RequestRecord) -> bool:
        if not r.ok:
            return False
        checks = ((self.ttft_s, r.ttft_s), (self.tpot_s, r.tpot_s), (self.e2e_s, r.e2e_s))
        return all(limit is None or (value is not None and value <= limit) for limit, value in checks)

    def as_dict(self) -> dict[str, float | None]:
        return {"ttft_s": self.ttft_s, "tpot_s": self.tpot_s, "e2e_s": self.e2e_s}


def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return None
    ordered = sorted(values)
    k = (len(ordered) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def _stats_ms(name: str, values_s: Sequence[float]) -> dict[str, float | None]:
    values = [v * 1000 for v in values_s]
    mean = sum(values) / len(values) if values else None
    return {
        f"mean_{name}_ms": mean,
        f"median_{name}_ms": percentile(values, 50),
        f"p90_{name}_ms": percentile(values, 90),
        f"p99_{name}_ms": percentile(values, 99),
    }


def aggregate(records: Sequence[RequestRecord], wall_s: float, slo: Slo | None = None) -> dict[str, Any]:
    ok = [r for r in records if r.ok]
    output = sum(r.output_tokens for r in ok)
    prompt = sum(r.prompt_tokens or 0 for r in ok)
    result: dict[str, Any] = {
        "completed": len(ok),
        "failed": len(records) - len(ok),
        "errors_by_kind": dict(Counter(r.error_kind for r in records if not r.ok)),
        "duration_s": wall_s,
        "total_input_tokens": prompt,
        "total_output_tokens": output,
        "total_cached_tokens": sum(r.cached_tokens or 0 for r in ok),
        "request_throughput": len(ok) / wall_s if wall_s > 0 else 0.0,
        "output_throughput": output / wall_s if wall_s > 0 else 0.0,
        "total_token_throughput": (prompt + output) / wall_s if wall_s > 0 else 0.0,
    }
    result |= _stats_ms("ttft", [r.ttft_s for r in ok if r.ttft_s is not None])
    result |= _stats_ms("tpot", [t for r in ok if (t := r.tpot_s) is not None])
    result |= _stats_ms("itl", [gap for r in ok for gap in r.itl_s])
    result |= _stats_ms("e2el", [r.e2e_s for r in ok])
    if slo is not None:
        good = sum(slo.met_by(r) for r in records)
        result["slo"] = slo.as_dict()
        result["request_goodput"] = good / wall_s if wall_s > 0 else 0.0
        result["slo_attainment"] = good / len(records) if records else 0.0
    measured = [r for r in ok if r.energy_joules is not None]
    if ok and len(measured) == len(ok):
        joules = sum(r.energy_joules for r in measured)  # type: ignore[misc]
        result["energy_joules"] = joules
        result["energy_sources"] = sorted({r.energy_source or "unknown" for r in measured})
        result["joules_per_output_token"] = joules / output if output else None
        result["output_tokens_per_joule"] = output / joules if joules else None
    return result

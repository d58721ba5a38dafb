"""Validation against published measurements: predict every row of bench/planner/published.yaml (with the class
defaults, never a calibration profile) and report |predicted - measured| / measured per metric."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from qanat.planner.catalog import Catalog
from qanat.planner.efficiency import default_efficiency
from qanat.planner.precision import KV_DTYPE_BYTES, get_precision
from qanat.planner.predict import Prediction, Workload, min_chips_to_fit, predict
from qanat.planner.step import Deployment

METRICS = ("output_tps", "tpot_s", "ttft_s", "joules_per_token", "power_w")
_OFFLINE_CONCURRENCY_PER_SLOT = 4  # "every request queued at once": well past any batch cap


@dataclass(frozen=True)
class RowResult:
    row: dict[str, Any]
    prediction: Prediction
    errors: dict[str, float]  # metric -> signed relative error (predicted / measured - 1)

    @property
    def tuning(self) -> bool:
        return bool(self.row.get("tuning"))

    @property
    def excluded(self) -> bool:
        return bool(self.row.get("exclude"))


def load_rows(path: Path) -> list[dict[str, Any]]:
    import yaml

    data = yaml.safe_load(path.read_text())
    rows = data["rows"]
    for row in rows:
        missing = {"id", "source", "model", "chip", "precision", "measured"} - set(row)
        if missing:
            raise ValueError(f"{path}: row {row.get('id', '?')} lacks {', '.join(sorted(missing))}")
    return list(rows)


def predict_row(catalog: Catalog, row: dict[str, Any]) -> Prediction:
    model, chip = catalog.model(row["model"]), catalog.chip(row["chip"])
    overrides = row.get("chip_overrides") or {}
    if "memory_gb" in overrides:
        chip = replace(chip, memory_bytes=float(overrides["memory_gb"]) * 1e9)
    eff, label = default_efficiency(chip.chip_class, row.get("engine"))
    if row.get("max_batch"):
        eff = replace(eff, max_batch=int(row["max_batch"]))
    precision = get_precision(row["precision"])
    kv = KV_DTYPE_BYTES[row["kv_dtype"]] if row.get("kv_dtype") else 2.0
    context = int(row["input_tokens"]) + int(row["output_tokens"])
    tp = int(row.get("tp") or min_chips_to_fit(model, chip, precision, kv, context, eff))
    concurrency = eff.max_batch * _OFFLINE_CONCURRENCY_PER_SLOT if row.get("offline") else int(row["concurrency"])
    workload = Workload(int(row["input_tokens"]), int(row["output_tokens"]), concurrency=concurrency)
    return predict(model, chip, Deployment(tp, precision, kv), eff, workload, {"efficiency": label})


def run_validation(path: Path, catalog: Catalog | None = None) -> list[RowResult]:
    catalog = catalog or Catalog([])
    results = []
    for row in load_rows(path):
        pred = predict_row(catalog, row)
        errors = {}
        for metric, measured in row["measured"].items():
            value = getattr(pred, metric)
            if value is not None and not math.isinf(value):
                errors[metric] = value / float(measured) - 1
        results.append(RowResult(row, pred, errors))
    return results


@dataclass(frozen=True)
class Summary:
    n: int
    median: float
    p90: float


def summarize(results: list[RowResult], metric: str, *, tuning: bool | None = None,
              saturated: bool | None = None) -> Summary | None:
    """Median and p90 of |error| over the rows that measured `metric` (optionally only tuning/held-out rows,
    and for TTFT only rows below or at saturation)."""
    errors = []
    for r in results:
        if r.excluded or metric not in r.errors or (tuning is not None and r.tuning != tuning):
            continue
        if saturated is not None and bool(r.row.get("expect_saturated")) != saturated:
            continue
        errors.append(abs(r.errors[metric]))
    if not errors:
        return None
    errors.sort()
    p90 = errors[min(len(errors) - 1, math.ceil(0.9 * len(errors)) - 1)]
    return Summary(len(errors), statistics.median(errors), p90)


def saturation_flags(results: list[RowResult]) -> tuple[int, int, int]:
    """(rows whose measured TTFT is queue wait, of them flagged saturated, unsaturated rows wrongly flagged)."""
    kept = [r for r in results if not r.excluded]
    expected = [r for r in kept if r.row.get("expect_saturated")]
    flagged = sum(1 for r in expected if r.prediction.saturated)
    wrong = sum(1 for r in kept if not r.row.get("expect_saturated") and r.prediction.saturated
                and not r.row.get("offline"))
    return len(expected), flagged, wrong

"""Validate `qanat plan` against bench/planner/published.yaml and print the markdown docs/planner.md quotes.

    .venv/bin/python bench/planner_validate.py [--rows]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from qanat.planner.validation import METRICS, run_validation, saturation_flags, summarize

TABLE = Path(__file__).parent / "planner" / "published.yaml"


def _cell(summary: object) -> str:
    if summary is None:
        return "—"
    return f"{summary.median * 100:.0f} % / {summary.p90 * 100:.0f} % (n={summary.n})"  # type: ignore[attr-defined]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", action="store_true", help="also print every row's prediction and error")
    args = parser.parse_args()
    results = run_validation(TABLE)
    print("| metric | all rows: median / p90 |APE| | held-out rows | tuning rows |")
    print("|---|---|---|---|")
    for metric in METRICS:
        sat = False if metric == "ttft_s" else None
        label = "ttft_s (below saturation)" if metric == "ttft_s" else metric
        print(f"| {label} | {_cell(summarize(results, metric, saturated=sat))} | "
              f"{_cell(summarize(results, metric, tuning=False, saturated=sat))} | "
              f"{_cell(summarize(results, metric, tuning=True, saturated=sat))} |")
    print(f"| ttft_s (saturated: queue wait) | {_cell(summarize(results, 'ttft_s', saturated=True))} | | |")
    expected, flagged, wrong = saturation_flags(results)
    print(f"\nRows whose measured TTFT is queue wait: {expected}; flagged saturated: {flagged}; "
          f"other closed-loop rows flagged saturated: {wrong}.")
    excluded = [r for r in results if r.excluded]
    if excluded:
        print(f"\nExcluded rows ({len(excluded)}), not in the figures above:")
        for r in excluded:
            errs = ", ".join(f"{m} {e * 100:+.0f} %" for m, e in r.errors.items())
            print(f"- {r.row['id']}: {errs} — {r.row['exclude']}")
    sources: dict[str, list[float]] = {}
    for r in results:
        if r.excluded:
            continue
        key = r.row["id"].split("-")[0]
        sources.setdefault(key, []).extend(abs(e) for e in r.errors.values())
    print("\n| source family | rows | median |APE| over all its metrics |")
    print("|---|---|---|")
    for key, errors in sources.items():
        errors.sort()
        n_rows = sum(1 for r in results if r.row["id"].split("-")[0] == key and not r.excluded)
        print(f"| {key} | {n_rows} | {errors[len(errors) // 2] * 100:.0f} % |")
    if args.rows:
        print("\n| id | metric | measured | predicted | error | regime |")
        print("|---|---|---|---|---|---|")
        for r in results:
            for metric, err in r.errors.items():
                tag = " (tuning)" if r.tuning else " (excluded)" if r.excluded else ""
                print(f"| {r.row['id']}{tag} | {metric} | {r.row['measured'][metric]:.4g} | "
                      f"{getattr(r.prediction, metric):.4g} | {err * 100:+.0f} % | {r.prediction.regime} |")


if __name__ == "__main__":
    main()

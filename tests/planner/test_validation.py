"""The published-measurement table: every row sourced and predictable, queue-wait rows flagged, and the error bands
`qanat plan` prints equal to what the table gives."""

from __future__ import annotations

from pathlib import Path

import pytest

from qanat.planner.predict import ERROR_BANDS
from qanat.planner.validation import load_rows, run_validation, saturation_flags, summarize

TABLE = Path(__file__).parents[2] / "bench" / "planner" / "published.yaml"


@pytest.fixture(scope="module")
def results():  # type: ignore[no-untyped-def]
    return run_validation(TABLE)


def test_every_row_has_a_source_and_a_measurement() -> None:
    rows = load_rows(TABLE)
    assert len(rows) >= 60
    assert len({r["id"] for r in rows}) == len(rows)
    for row in rows:
        assert row["source"].startswith("https://"), row["id"]
        assert set(row["measured"]) <= {"output_tps", "tpot_s", "ttft_s", "joules_per_token", "power_w"}, row["id"]


def test_every_row_is_predicted(results) -> None:  # type: ignore[no-untyped-def]
    for r in results:
        assert r.prediction.fits, r.row["id"]
        assert set(r.errors) == set(r.row["measured"]), r.row["id"]


def test_queue_wait_rows_are_flagged_saturated(results) -> None:  # type: ignore[no-untyped-def]
    expected, flagged, wrong = saturation_flags(results)
    assert expected >= 4
    assert flagged == expected
    assert wrong == 0


def test_printed_error_bands_match_the_table(results) -> None:  # type: ignore[no-untyped-def]
    for metric, (median, p90) in ERROR_BANDS.items():
        held_out = summarize(results, metric, tuning=False, saturated=False if metric == "ttft_s" else None)
        every = summarize(results, metric, saturated=False if metric == "ttft_s" else None)
        summary = held_out if held_out is not None and held_out.n >= 10 else every
        assert summary is not None
        assert (median, p90) == (round(summary.median, 2), round(summary.p90, 2)), metric

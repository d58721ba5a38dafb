"""`qanat bench` end to end against the real `qanat serve` and the real model; then `bench compare`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.e2e.server import ServerProcess


def qanat(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "qanat.cli", *args], capture_output=True, text=True, timeout=600)


def test_bench_against_qanat_serve_writes_result_summary_plots_and_compares(
    server: ServerProcess, tmp_path: Path
) -> None:
    common = ["bench", "--url", f"{server.base_url}/v1", "--num-requests", "6", "--input-tokens", "60",
              "--output-tokens", "12", "--quiet", "--slo", "ttft=30s,tpot=2s"]
    first = qanat(*common, "--concurrency", "1,3", "--out", str(tmp_path / "a"))
    assert first.returncode == 0, first.stderr
    result = json.loads((tmp_path / "a" / "result.json").read_text())
    assert result["schema_version"] == 1
    assert result["config"]["model"] == "SmolLM2-135M-Instruct" and result["config"]["prompt_lengths_exact"]
    assert [run["load"] for run in result["runs"]] == [1, 3]
    for run in result["runs"]:
        agg = run["aggregate"]
        assert agg["completed"] == 6 and agg["failed"] == 0
        assert agg["total_output_tokens"] == 6 * 12  # ignore_eos gives the fixed output length
        assert agg["median_ttft_ms"] > 0 and agg["median_tpot_ms"] > 0 and agg["output_throughput"] > 0
        assert agg["slo_attainment"] == 1.0
        assert len(run["requests"]) == 6 and all(r["prompt_tokens"] > 60 for r in run["requests"])  # + template
    summary = (tmp_path / "a" / "summary.md").read_text()
    assert "out tok/s" in summary and "| 3 |" in summary
    for plot in ("latency_cdf.png", "throughput_latency.png"):
        assert (tmp_path / "a" / plot).read_bytes()[:4] == b"\x89PNG"
    assert "out tok/s" in first.stdout  # the summary is printed too

    second = qanat(*common, "--concurrency", "1,3", "--endpoint", "completions", "--dataset", "multilingual",
                   "--out", str(tmp_path / "b"))
    assert second.returncode == 0, second.stderr
    compared = qanat("bench", "compare", str(tmp_path / "a" / "result.json"), str(tmp_path / "b" / "result.json"))
    assert compared.returncode == 0, compared.stderr
    rows = [line for line in compared.stdout.splitlines() if line.startswith("| a |") or line.startswith("| b |")]
    assert len(rows) == 4
    assert all("| 1.00 |" in row for row in rows if row.startswith("| a |"))  # the first result is the baseline

    broken = tmp_path / "broken.json"
    broken.write_text("{}")
    bad = qanat("bench", "compare", str(tmp_path / "a" / "result.json"), str(broken))
    assert bad.returncode == 2 and "not a qanat bench result" in bad.stderr

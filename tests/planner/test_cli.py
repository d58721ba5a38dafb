"""`qanat plan` from the command line: tables, JSON, --compare, the plot, the lists."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qanat.cli import main


@pytest.fixture(autouse=True)
def no_profiles(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QANAT_PLANNER_HOME", str(tmp_path / "home"))  # never the user's own profiles
    monkeypatch.setenv("COLUMNS", "220")  # rich folds headers in narrow terminals


def test_json_for_one_chip(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--model", "Llama-3.1-8B", "--chip", "H100-SXM", "--precision", "fp8",
                 "--input-tokens", "1000", "--output-tokens", "1000", "--concurrency", "50", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["chip"] == "H100-SXM" and out["precision"] == "fp8" and out["fits"]
    assert out["concurrency"] == 50 and 0 < out["tpot_s"] < 0.1
    assert out["output_tps"] == pytest.approx(out["output_tps_per_user"] * 50 * out["tpot_s"] * 1000 /
                                              (out["ttft_s"] + 999 * out["tpot_s"]), rel=1e-6)
    assert out["sources"]["efficiency"] == "default:gpu-hbm/optimized"
    assert out["sources"]["peak"].startswith("fp8 1,978.9 TFLOPS")
    assert {"output_tps", "tpot_s", "ttft_s", "joules_per_token"} <= set(out["error_band"])
    assert out["curve"] and out["curve"][0]["concurrency"] == 1


def test_compare_table_and_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    plot = tmp_path / "curve.png"
    assert main(["plan", "--model", "Llama-3.3-70B", "--compare", "H100-SXM,MI300X,TPU-v6e,Groq-LPU",
                 "--precision", "fp8", "--slo", "ttft=2s,tpot=50ms", "--target-rps", "10", "--plot", str(plot)]) == 0
    out = capsys.readouterr().out
    for chip in ("H100-SXM", "MI300X", "TPU-v6e", "Groq-LPU"):
        assert chip in out
    assert "chips needed" in out  # a target load was given
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_fleet_of_chips(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--model", "Llama-3.3-70B", "--chip", "H100-SXM", "--precision", "fp8", "--tp", "2",
                 "--chips", "16", "--concurrency", "32", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["fleet_replicas"] == 8
    assert out["fleet_output_tps"] == pytest.approx(8 * out["output_tps"])


def test_compare_json_is_a_list(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--model", "Qwen3-30B-A3B", "--compare", "B200,L4", "--json", "--concurrency", "4"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [p["chip"] for p in out] == ["B200", "L4"]


def test_does_not_fit_is_reported_not_raised(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--model", "DeepSeek-V3", "--chip", "L4", "--tp", "1", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["fits"] is False and out["regime"] == "does-not-fit" and out["tpot_s"] is None


def test_lists_show_sources(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--list-chips"]) == 0
    chips = capsys.readouterr().out
    assert "Groq-LPU" in chips and "nvidia.com" in chips
    assert main(["plan", "--list-models"]) == 0
    models = capsys.readouterr().out
    assert "DeepSeek-V3" in models and "MLA" in models and "huggingface.co" in models


def test_bad_arguments_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--chip", "pdp-11", "--model", "Llama-3.1-8B"]) == 2
    assert "unknown chip" in capsys.readouterr().err
    assert main(["plan", "--model", "Llama-3.1-8B", "--chip", "H100", "--concurrency", "2", "--rate", "1"]) == 2
    assert "not both" in capsys.readouterr().err

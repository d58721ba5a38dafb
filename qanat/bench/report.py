"""Bench results: result.json (versioned), summary.md, PNG plots, and side-by-side comparison."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1

# (label, field, digits) for the summary table; latencies are in ms.
SUMMARY_COLUMNS = [
    ("ok", "completed", 0),
    ("failed", "failed", 0),
    ("req/s", "request_throughput", 2),
    ("out tok/s", "output_throughput", 1),
    ("TTFT p50", "median_ttft_ms", 0),
    ("TTFT p99", "p99_ttft_ms", 0),
    ("TPOT p50", "median_tpot_ms", 1),
    ("ITL p99", "p99_itl_ms", 1),
    ("E2E p50", "median_e2el_ms", 0),
    ("goodput req/s", "request_goodput", 2),
    ("J/token", "joules_per_output_token", 3),
]


def _fmt(value: Any, digits: int) -> str:
    if value is None:
        return "—"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def summary_markdown(result: dict[str, Any]) -> str:
    config = result["config"]
    lines = [
        f"# qanat bench: {config['url']} ({config['model']})",
        "",
        f"- endpoint `{config['endpoint']}`, {config['mode']} loop; workload: {config['workload']['dataset']}, "
        f"{config['workload']['input_tokens']} input tokens "
        f"({'exact' if config['prompt_lengths_exact'] else 'ESTIMATED, no tokenizer'}), "
        f"{config['workload']['output_tokens']} output tokens, shared prefix "
        f"{config['workload']['shared_prefix_tokens']}, seed {config['workload']['seed']}",
        f"- latencies in ms; started {result['environment']['started_at']} on {result['environment']['host']}",
        "",
        f"| {config['mode']} | " + " | ".join(label for label, _, _ in SUMMARY_COLUMNS) + " |",
        "|---|" + "---|" * len(SUMMARY_COLUMNS),
    ]
    for run in result["runs"]:
        cells = [_fmt(run["aggregate"].get(key), digits) for _, key, digits in SUMMARY_COLUMNS]
        label = run["load"]
        if "phase" in run:  # --sweep: each run has its own workload
            workload = run["workload"]
            label = f"{run['phase']} {run['load']} ({workload['input_tokens']}/{workload['output_tokens']})"
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    errors = {run["load"]: run["aggregate"]["errors_by_kind"] for run in result["runs"] if run["aggregate"]["failed"]}
    if errors:
        lines += ["", "Errors by kind: " + "; ".join(f"{load}: {kinds}" for load, kinds in errors.items())]
        examples = [r["error"] for run in result["runs"] for r in run["requests"] if r.get("error")][:3]
        lines += [f"- e.g. {e}" for e in examples]
    sources = sorted({s for run in result["runs"] for s in run["aggregate"].get("energy_sources", [])})
    if sources:
        lines += ["", f"Energy as reported by the target: {', '.join(sources)}"]
    return "\n".join(lines) + "\n"


def write_plots(result: dict[str, Any], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for run in result["runs"]:
        for ax, key in zip(axes, ("ttft_s", "e2e_s"), strict=True):
            values = sorted(r[key] * 1000 for r in run["requests"] if r["ok"] and r[key] is not None)
            if values:
                ax.plot(values, [(i + 1) / len(values) for i in range(len(values))], label=str(run["load"]))
    for ax, title in zip(axes, ("TTFT", "End-to-end latency"), strict=True):
        ax.set_title(f"{title} CDF")
        ax.set_xlabel("ms")
        ax.set_ylabel("fraction of requests")
        ax.grid(alpha=0.3)
        ax.legend(title=result["config"]["mode"])
    fig.tight_layout()
    written.append(out / "latency_cdf.png")
    fig.savefig(written[-1], dpi=100)
    plt.close(fig)

    loads = [run["load"] for run in result["runs"]]
    fig, ax1 = plt.subplots(figsize=(6, 4))
    ax1.plot(loads, [run["aggregate"]["output_throughput"] for run in result["runs"]], "o-", color="tab:blue")
    ax1.set_xlabel("concurrency" if result["config"]["mode"] == "closed" else "request rate (req/s)")
    ax1.set_ylabel("output tokens/s", color="tab:blue")
    ax2 = ax1.twinx()
    ax2.plot(loads, [run["aggregate"]["p99_e2el_ms"] for run in result["runs"]], "s--", color="tab:red")
    ax2.set_ylabel("p99 end-to-end latency (ms)", color="tab:red")
    ax1.set_title("Throughput and p99 latency")
    fig.tight_layout()
    written.append(out / "throughput_latency.png")
    fig.savefig(written[-1], dpi=100)
    plt.close(fig)
    return written


def write_result(result: dict[str, Any], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    (out / "result.json").write_text(json.dumps(result, indent=2, ensure_ascii=False))
    (out / "summary.md").write_text(summary_markdown(result), encoding="utf-8")
    return [out / "result.json", out / "summary.md", *write_plots(result, out)]


def load_result(path: Path) -> dict[str, Any]:
    try:
        result = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {path}: {e}") from e
    if not isinstance(result, dict) or result.get("schema_version") != SCHEMA_VERSION:
        raise ValueError(f"{path} is not a qanat bench result (schema_version {SCHEMA_VERSION})")
    return result


def compare_markdown(paths: list[Path]) -> str:
    """One row per (result, load); ratios against the first result at the same load."""
    results = [load_result(p) for p in paths]
    base = {run["load"]: run["aggregate"] for run in results[0]["runs"]}
    keys = [("out tok/s", "output_throughput", 1), ("TTFT p50", "median_ttft_ms", 0),
            ("TPOT p50", "median_tpot_ms", 1), ("E2E p99", "p99_e2el_ms", 0)]
    lines = ["| result | load | " + " | ".join(f"{label} | ×" for label, _, _ in keys) + " |",
             "|---|---|" + "---|---|" * len(keys)]
    for path, result in zip(paths, results, strict=True):
        for run in result["runs"]:
            cells = []
            for _, key, digits in keys:
                value, ref = run["aggregate"].get(key), base.get(run["load"], {}).get(key)
                ratio = value / ref if value is not None and ref else None
                cells.append(f"{_fmt(value, digits)} | {_fmt(ratio, 2)}")
            lines.append(f"| {path.parent.name or path.name} | {run['load']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"

"""Output for people (rich tables), programs (JSON) and slides (a latency-throughput plot)."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from qanat.planner.chips import ChipSpec
from qanat.planner.model import ModelSpec
from qanat.planner.predict import Prediction


def _num(value: float | None, fmt: str, scale: float = 1.0, unit: str = "") -> str:
    if value is None:
        return "—"
    if math.isinf(value):
        return "∞"
    return f"{value * scale:{fmt}}{unit}"


def _band(pred: Prediction, key: str) -> str:
    band = pred.error_band.get(key)
    return f" ±{band[0] * 100:.0f}%" if band else ""


# (label, short label for the side-by-side table, how to show one prediction)
ROWS: list[tuple[str, str, Callable[[Prediction], str]]] = [
    ("fits", "fits", lambda p: ("yes" if p.fits else "NO") + f", {p.chips_per_replica} chip"
     + ("s" if p.chips_per_replica > 1 else "")),
    ("memory", "GB w/kv", lambda p: f"{p.weights_gb:,.1f} GB weights + {p.kv_gb_per_sequence * 1e3:,.0f} MB KV per "
     f"sequence, {p.memory_gb:,.0f} GB usable"),
    ("batch cap", "cap", lambda p: f"{p.batch_cap} ({p.batch_cap_reason})"),
    ("regime", "regime", lambda p: p.regime),
    ("concurrency", "conc", lambda p: _num(p.concurrency, ",.0f")),
    ("TTFT", "TTFT ms", lambda p: _num(p.ttft_s, ",.0f", 1e3, " ms") + _band(p, "ttft_s")),
    ("time per output token", "TPOT ms", lambda p: _num(p.tpot_s, ",.1f", 1e3, " ms") + _band(p, "tpot_s")),
    ("output tok/s (replica)", "tok/s", lambda p: _num(p.output_tps, ",.0f") + _band(p, "output_tps")),
    ("output tok/s per user", "tok/s/user", lambda p: _num(p.output_tps_per_user, ",.1f")),
    ("output tok/s per chip", "tok/s/chip", lambda p: _num(p.output_tps_per_chip, ",.0f")),
    ("max concurrency in SLO", "max conc", lambda p: "none" if p.fits and p.max_concurrency_slo is None
     else _num(p.max_concurrency_slo, ",.0f")),
    ("power (replica)", "W", lambda p: _num(p.power_w, ",.0f", unit=" W")),
    ("joules per output token", "J/tok", lambda p: _num(p.joules_per_token, ".3g", unit=" J")
     + _band(p, "joules_per_token")),
    ("$ per million output tokens", "$/Mtok", lambda p: _num(p.usd_per_million_tokens, ",.3f", unit=" $")),
    ("chips for target load", "chips needed", lambda p: "—" if p.chips_needed is None
     else f"{p.chips_needed} ({p.replicas_needed} replicas)"),
    ("fleet output tok/s (--chips)", "fleet tok/s", lambda p: "—" if p.fleet_output_tps is None
     else f"{p.fleet_output_tps:,.0f} ({p.fleet_replicas} replicas)"),
]
_COMPACT_SKIP = {"memory", "output tok/s per chip", "batch cap"}


def prediction_table(preds: Sequence[Prediction], title: str) -> Table:
    table = Table(title=title, title_justify="left")
    if len(preds) == 1:  # one chip: a column of figures
        table.add_column("")
        table.add_column(preds[0].chip)
        for label, _, show in ROWS:
            table.add_row(label, show(preds[0]))
        return table
    skip = set(_COMPACT_SKIP)
    if all(p.chips_needed is None for p in preds):
        skip.add("chips for target load")
    if all(p.fleet_output_tps is None for p in preds):
        skip.add("fleet output tok/s (--chips)")
    if all(p.max_concurrency_slo in (None, p.batch_cap) for p in preds):
        skip.add("max concurrency in SLO")
    rows = [r for r in ROWS if r[0] not in skip]
    table.add_column("chip")
    for _, short, _ in rows:
        table.add_column(short, overflow="fold")
    units = (" ms", " W", " J", " $")
    for p in preds:
        cells = []
        for _, _, show in rows:
            cell = show(p).split(" ±")[0]  # the bands are printed once below the table
            for unit in units:
                cell = cell.replace(unit, "")
            cells.append(cell)
        table.add_row(p.chip, *cells)
    return table


def print_predictions(preds: Sequence[Prediction], title: str, console: Console | None = None) -> None:
    console = console or Console()
    console.print(prediction_table(preds, title))
    for p in preds:
        console.print(f"[bold]{p.chip}[/bold]: " + "; ".join(f"{k}: {v}" for k, v in p.sources.items()))
        kind = "calibration residuals" if p.sources.get("efficiency", "").startswith("calibrated") else (
            "validation error, uncalibrated")
        if p.error_band:
            console.print(f"  ± is the median {kind}: " + ", ".join(
                f"{k} {v[0] * 100:.0f}% (p90 {v[1] * 100:.0f}%)" for k, v in p.error_band.items()))
        for note in p.notes:
            console.print(f"  note: {note}")


def predictions_json(preds: Sequence[Prediction]) -> str:
    def clean(value: Any) -> Any:
        if isinstance(value, float) and (math.isinf(value) or math.isnan(value)):
            return None
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [clean(v) for v in value]
        return value

    data = [clean(p.to_dict()) for p in preds]
    return json.dumps(data[0] if len(data) == 1 else data, indent=2)


def chips_table(chips: Sequence[ChipSpec]) -> Table:
    table = Table(title="Chips (dense peak per chip)", title_justify="left")
    for column in ("name", "class", "peak TFLOPS", "memory", "bandwidth", "TDP", "$/h", "sources"):
        table.add_column(column, overflow="fold")
    for c in chips:
        flops = ", ".join(f"{k} {v / 1e12:,.0f}" if v >= 1e12 else f"{k} {v / 1e12:.2f}"
                          for k, v in c.peak_flops.items())
        memory = f"{c.memory_bytes / 1e9:,.2f} GB" + (" SRAM" if c.sram_is_memory else "")
        table.add_row(c.name, c.chip_class, flops, memory, f"{c.memory_bw / 1e9:,.0f} GB/s", f"{c.tdp_w:,.0f} W",
                      "—" if c.price_per_hour is None else f"{c.price_per_hour:.2f}",
                      "; ".join(c.sources) + (f" ({c.notes})" if c.notes else ""))
    return table


def models_table(models: Sequence[ModelSpec]) -> Table:
    table = Table(title="Models", title_justify="left")
    for column in ("name", "params", "active", "layers", "heads/kv", "KV per token (16-bit)", "features", "source"):
        table.add_column(column, overflow="fold")
    for m in models:
        features = ", ".join(f for f, on in (
            (f"MoE {m.n_experts_active}/{m.n_experts}", m.is_moe), ("MLA", m.is_mla),
            (f"sliding {m.sliding_window} on {m.sliding_fraction:.0%}", bool(m.sliding_window)),
            ("GQA", m.n_kv_heads < m.n_heads and not m.is_mla)) if on)
        table.add_row(m.name, f"{m.params_total / 1e9:,.2f} B", f"{m.params_active / 1e9:,.2f} B", str(m.n_layers),
                      f"{m.n_heads}/{m.n_kv_heads}", f"{m.kv_bytes_per_token(2) / 1024:,.0f} KiB", features, m.source)
    return table


def plot_curves(preds: Sequence[Prediction], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for p in preds:
        if p.curve:
            ax.plot([pt["output_tps_per_chip"] for pt in p.curve], [pt["tpot_ms"] for pt in p.curve], "o-",
                    label=p.chip, markersize=3)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("output tokens/s per chip")
    ax.set_ylabel("time per output token (ms)")
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

"""`qanat plan`: arguments, and the wiring from them to predictions, calibration and output."""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

from qanat.planner.catalog import Catalog
from qanat.planner.chips import ChipSpec
from qanat.planner.efficiency import ENGINES, Efficiency, default_efficiency
from qanat.planner.model import ModelSpec
from qanat.planner.precision import KV_DTYPE_BYTES, Precision, get_precision, gguf_precision
from qanat.planner.predict import Prediction, Workload, min_chips_to_fit, predict
from qanat.planner.step import Deployment


def add_plan_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="catalog name, a .gguf file, or an HF config.json (default: the embedded SmolLM2 GGUF)")
    p.add_argument("--chip", default="this-machine", help="chip name (--list-chips), or this-machine")
    p.add_argument("--compare", help="comma-separated chips side by side, e.g. H100-SXM,MI300X,TPU-v6e")
    p.add_argument("--precision", help="bf16, fp8, fp4, int8, int4 or a GGUF type (default: the GGUF's, else bf16)")
    p.add_argument("--kv-dtype", choices=sorted(KV_DTYPE_BYTES), help="KV-cache type (default: follows precision)")
    p.add_argument("--input-tokens", type=int, default=1000)
    p.add_argument("--output-tokens", type=int, default=200)
    p.add_argument("--concurrency", type=int, help="closed loop: requests in flight (default: most meeting the SLOs)")
    p.add_argument("--rate", type=float, help="open loop: Poisson request rate per second")
    p.add_argument("--slo", help="latency targets, e.g. ttft=500ms,tpot=50ms")
    p.add_argument("--tp", type=int, help="chips per replica (tensor parallel); default: fewest that fit")
    p.add_argument("--target-rps", type=float, help="size the fleet for this many requests/s")
    p.add_argument("--chips", type=int, help="chips available: how many replicas they hold and what they serve")
    p.add_argument("--engine", help=f"engine family ({', '.join(ENGINES)}) or a calibrated profile's engine name")
    p.add_argument("--max-batch", type=int, help="running sequences per replica at most (engine's batch cap)")
    p.add_argument("--chunk-tokens", type=int, help="prompt tokens per step at most (chunked prefill)")
    p.add_argument("--price-per-hour", type=float, help="US$ per chip-hour, instead of the catalog's")
    p.add_argument("--threads", type=int, help="this-machine: cores to count (default: all)")
    p.add_argument("--no-profile", action="store_true", help="ignore calibration profiles")
    p.add_argument("--catalog", action="append", type=Path, help="YAML file adding chips or models (repeatable)")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.add_argument("--plot", type=Path, help="write a latency-throughput PNG here")
    p.add_argument("--list-chips", action="store_true")
    p.add_argument("--list-models", action="store_true")
    p.add_argument("--calibrate", type=Path, metavar="RESULT.json",
                   help="fit --chip's efficiency factors and power curve to a `qanat bench` result; saves a profile")


def _model(catalog: Catalog, ref: str | None) -> ModelSpec:
    if ref is None:
        from qanat.models.locate import default_model_path

        return catalog.model(str(default_model_path()))
    return catalog.model(ref)


def _precision(model: ModelSpec, name: str | None) -> Precision:
    if name is None and model.gguf is not None:
        g = model.gguf
        params = model.params_total
        return gguf_precision(g.file_type, g.total_bytes * 8 / params if params else 16)
    if name is not None and model.gguf is not None and name.upper() == model.gguf.file_type:
        return _precision(model, None)
    return get_precision(name or "bf16")


def _efficiency(chip: ChipSpec, precision: Precision, args: argparse.Namespace) -> tuple[
        Efficiency, str, dict[str, tuple[float, float]] | None, ChipSpec]:
    from qanat.planner.calibrate import find_profile

    family = args.engine if args.engine in ENGINES else None
    eff, label = default_efficiency(chip.chip_class, family)
    band = None
    profile = None if args.no_profile else find_profile(chip.name, precision.name, args.engine)
    if profile is not None:
        eff = Efficiency.from_dict(profile["efficiency"], eff)
        figures = profile.get("chip_figures")
        if figures:  # the factors were fitted against these figures (a probed host differs run to run)
            chip = replace(chip, memory_bw=figures["memory_bw"], peak_flops=dict(figures["peak_flops"]),
                           tdp_w=figures["tdp_w"])
        label = f"calibrated:{profile['engine']} profile {profile['path']} ({profile['created']})"
        band = {k: (v["median"], v["p90"]) for k, v in profile.get("residuals", {}).items()}
    overrides = {"max_batch": args.max_batch, "chunk_tokens": args.chunk_tokens}
    eff = replace(eff, **{k: v for k, v in overrides.items() if v is not None})
    return eff, label, band, chip


def plan_one(catalog: Catalog, model: ModelSpec, chip_name: str, args: argparse.Namespace,
             workload: Workload) -> Prediction:
    chip = catalog.chip(chip_name, args.threads)
    if args.price_per_hour is not None:
        chip = replace(chip, price_per_hour=args.price_per_hour, price_note="--price-per-hour")
    precision = _precision(model, args.precision)
    kv = KV_DTYPE_BYTES[args.kv_dtype] if args.kv_dtype else (
        1.0 if precision.kv_bytes == 1 and chip.flops("fp8")[1] == "fp8" else 2.0)
    eff, eff_label, band, chip = _efficiency(chip, precision, args)
    context = workload.input_tokens + workload.output_tokens
    tp = args.tp or min_chips_to_fit(model, chip, precision, kv, context, eff)
    flops, compute = chip.flops(precision.compute)
    sources = {
        "model": model.source + (" (exact GGUF tensor bytes)" if model.gguf else ""),
        "chip": "; ".join(chip.sources) or "user catalog",
        "peak": f"{compute} {flops / 1e12:,.1f} TFLOPS, {chip.memory_bw / 1e9:,.0f} GB/s (datasheet)"
                if chip.chip_class != "cpu-host" else "this host (see chip sources)",
        "efficiency": eff_label,
        "power": f"TDP {chip.tdp_w:,.0f} W (chip sources), idle "
                 + (f"{eff.idle_w:,.1f} W (calibrated)" if eff.idle_w is not None else
                    f"{chip.idle_w:,.0f} W (chip sources)" if chip.idle_w is not None else
                    f"{eff.idle_frac:.0%} of TDP (class default)")
                 + f"; power curve {'calibrated' if eff.idle_w is not None else 'class default'}",
        "price": chip.price_note or ("none published" if chip.price_per_hour is None else "catalog"),
        "chips per replica": "--tp" if args.tp else (
            "fewest that hold weights + one sequence" if chip.sram_is_memory
            else "fewest (power of two) leaving a quarter of memory to the KV cache"),
    }
    calibrated = eff_label.startswith("calibrated")
    return predict(model, chip, Deployment(tp, precision, kv), eff, workload, sources,
                   calibrated=calibrated, error_band=band, simulate=calibrated)


def _calibrate(catalog: Catalog, args: argparse.Namespace) -> int:
    from qanat.bench.report import load_result
    from qanat.planner.calibrate import fit, observations, save_profile, step_variation

    result = load_result(args.calibrate)
    model_ref = args.model
    if model_ref is None:
        from qanat.models.locate import DEFAULT_MODEL_ID

        if result["config"]["model"] != DEFAULT_MODEL_ID:
            raise ValueError(f"the result served {result['config']['model']!r}: pass --model (a catalog name, GGUF "
                             "or config.json) so calibration knows its shape")
    model = _model(catalog, model_ref)
    chip = catalog.chip(args.chip, args.threads)
    precision = _precision(model, args.precision)
    kv = KV_DTYPE_BYTES[args.kv_dtype] if args.kv_dtype else precision.kv_bytes
    engine = args.engine or ("qanat" if chip.chip_class == "cpu-host" else "optimized")
    base, label, _, _ = _efficiency(chip, precision, argparse.Namespace(**{**vars(args), "no_profile": True}))
    tp = args.tp or 1
    base = replace(base, step_sigma=step_variation(result))  # measured, not fitted: the replays draw steps with it
    fitted = fit(model, chip, Deployment(tp, precision, kv), base, observations(result))
    path = save_profile(chip, engine, precision.name, model.name, fitted, str(args.calibrate))
    e = fitted.efficiency
    print(f"calibrated {chip.name} / {engine} / {precision.name} from {fitted.used_runs} runs of {args.calibrate} "
          f"(start: {label})")
    print(f"  bandwidth efficiency {e.mem:.3f}, compute {e.compute:.3f}, attention {e.attention:.3g} "
          f"(decode {e.decode_attention_eff:.3g}), "
          f"fixed per step {e.step_s * 1e3:.2f} ms, per decoded sequence {e.token_s * 1e3:.2f} ms, "
          f"step-time spread (log sigma, measured) {e.step_sigma:.3f}")
    if e.idle_w is not None:
        print(f"  power: idle {e.idle_w:.1f} W, memory share {e.power_mem:.3f}, compute share {e.power_compute:.3f}")
    for metric, r in fitted.residuals.items():
        print(f"  fit residual {metric}: median {r['median'] * 100:.1f} %, p90 {r['p90'] * 100:.1f} % (n={r['n']:.0f})")
    if fitted.step_residuals:
        r = fitted.step_residuals
        print(f"  fit residual decode-only step: median {r['median'] * 100:.1f} %, p90 {r['p90'] * 100:.1f} % "
              f"(n={r['n']:.0f})")
    for reason in fitted.skipped:
        print(f"  skipped a run: {reason}")
    print(f"wrote {path}")
    return 0


def run_plan(args: argparse.Namespace) -> int:
    from rich.console import Console

    from qanat.bench.metrics import Slo
    from qanat.planner import render

    catalog = Catalog(args.catalog)
    console = Console()
    if args.list_chips:
        console.print(render.chips_table(list(catalog.chips.values())))
        return 0
    if args.list_models:
        console.print(render.models_table(list(catalog.models.values())))
        return 0
    if args.calibrate:
        return _calibrate(catalog, args)
    slo = Slo.parse(args.slo) if args.slo else None
    workload = Workload(args.input_tokens, args.output_tokens, args.concurrency, args.rate,
                        slo.ttft_s if slo else None, slo.tpot_s if slo else None, args.target_rps, args.chips)
    model = _model(catalog, args.model)
    chips = [c.strip() for c in args.compare.split(",") if c.strip()] if args.compare else [args.chip]
    preds = [plan_one(catalog, model, name, args, workload) for name in chips]
    load = (f"concurrency {args.concurrency}" if args.concurrency else f"{args.rate} req/s" if args.rate
            else "most concurrency in SLO" if slo else "full batch")
    title = (f"{model.name} ({preds[0].precision}), {args.input_tokens} in / {args.output_tokens} out, {load}"
             + (f", SLO {args.slo}" if slo else ""))
    if args.json:
        print(render.predictions_json(preds))
    else:
        render.print_predictions(preds, title, console)
    if args.plot:
        print(f"wrote {render.plot_curves(preds, args.plot, title)}", file=sys.stderr)
    return 0

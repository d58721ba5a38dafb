"""After `qanat plan --calibrate`, compare the calibrated predictions with a later `qanat bench` run of the same server.

    .venv/bin/python bench/planner_calibration_check.py RESULT.json [--chip this-machine --threads 2 --engine qanat]

Prints one row per run (measured vs predicted TPOT, TTFT, output tok/s) and the median |error| per metric. The
measured TTFT and TPOT are medians over the requests after each run's first wave (its first C requests start
together and queue behind each other's prompts; the planner predicts the steady state after it); --all-requests
takes every request, as the benchmark's summary does.
"""

from __future__ import annotations

import argparse
import statistics
from dataclasses import replace
from pathlib import Path

from qanat.bench.report import load_result
from qanat.models.locate import default_model_path
from qanat.planner.calibrate import find_profile, observations, predict_run
from qanat.planner.catalog import Catalog
from qanat.planner.efficiency import Efficiency, default_efficiency
from qanat.planner.gguf import model_from_gguf
from qanat.planner.precision import gguf_precision
from qanat.planner.step import Deployment


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("result", type=Path)
    parser.add_argument("--chip", default="this-machine")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--engine", default="qanat")
    parser.add_argument("--all-requests", action="store_true",
                        help="measured medians over every request, the first wave (C requests started together) "
                             "included, as the benchmark's summary reports them; default: the requests after it")
    args = parser.parse_args()
    model = model_from_gguf(default_model_path())
    assert model.gguf is not None
    precision = gguf_precision(model.gguf.file_type, model.gguf.total_bytes * 8 / model.params_total)
    chip = Catalog([]).chip(args.chip, args.threads)
    profile = find_profile(chip.name, precision.name, args.engine)
    if profile is None:
        raise SystemExit(f"no profile for {chip.name} / {args.engine} / {precision.name}: run qanat plan --calibrate")
    figures = profile["chip_figures"]
    chip = replace(chip, memory_bw=figures["memory_bw"], peak_flops=dict(figures["peak_flops"]), tdp_w=figures["tdp_w"])
    eff = Efficiency.from_dict(profile["efficiency"], default_efficiency(chip.chip_class)[0])
    deploy = Deployment(1, precision, 2.0)
    errors: dict[str, list[float]] = {"tpot_s": [], "ttft_s": [], "output_tps": []}
    print(f"profile {profile['path']} ({profile['created']})\n")
    print("| run | concurrency | prompt / output tokens | TPOT ms meas / pred | TTFT ms meas / pred "
          "| tok/s meas / pred |")
    print("|---|---|---|---|---|---|")
    for i, ob in enumerate(observations(load_result(args.result), steady=not args.all_requests)):
        tpot, ttft, tps = predict_run(model, chip, deploy, eff, ob)
        pairs = (("tpot_s", tpot, ob.tpot_s), ("ttft_s", ttft, ob.ttft_s), ("output_tps", tps, ob.output_tps))
        for key, pred, meas in pairs:
            if meas:
                errors[key].append(abs(pred / meas - 1))
        print(f"| {i} {ob.label} | {ob.concurrency} | {ob.input_tokens:.0f} / {ob.output_tokens:.0f} | "
              f"{(ob.tpot_s or 0) * 1e3:.1f} / {tpot * 1e3:.1f} | {(ob.ttft_s or 0) * 1e3:.0f} / {ttft * 1e3:.0f} | "
              f"{ob.output_tps:.1f} / {tps:.1f} |")
    print()
    for key, values in errors.items():
        if values:
            print(f"{key}: median |error| {statistics.median(values) * 100:.1f} %, max {max(values) * 100:.1f} % "
                  f"(n={len(values)})")


if __name__ == "__main__":
    main()

"""One entry point: `qanat serve | generate | bench | plan | energy`."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path

from qanat.config import FLASH_ATTN_MODES, ConfigError, EngineConfig, ServerConfig
from qanat.energy.carbon import CarbonModel
from qanat.energy.meters import METER_KINDS
from qanat.engine.core.speculation import SPECULATIVE_MODES


def _add_engine_args(parser: argparse.ArgumentParser) -> None:
    defaults = EngineConfig()
    parser.add_argument("--model", default=None, help="GGUF file (default: embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--ctx", type=int, default=defaults.ctx, help="context tokens per request")
    parser.add_argument("--parallel", type=int, default=defaults.parallel, help="sequences decoded together")
    parser.add_argument("--threads", type=int, default=defaults.threads, help="CPU threads for llama.cpp")
    parser.add_argument("--batch", type=int, default=defaults.batch_tokens, help="max tokens per forward pass")
    parser.add_argument("--max-waiting", type=int, default=defaults.max_waiting,
                        help="requests queued beyond the parallel slots before answering 429")
    parser.add_argument("--flash-attn", default=defaults.flash_attn, choices=FLASH_ATTN_MODES,
                        help="llama.cpp's flash attention")
    parser.add_argument("--deterministic", action="store_true",
                        help="bit-identical results whatever else runs (no prefix cache, flash attention off)")
    parser.add_argument("--energy-meter", default=defaults.energy_meter, choices=METER_KINDS,
                        help="where per-request joules come from (auto: NVML, then RAPL, then a CPU-time estimate)")
    parser.add_argument("--cpu-tdp-w", type=float, default=None,
                        help="CPU package TDP in watts for the estimate (default: from a built-in table)")
    parser.add_argument("--cache-ram", type=int, default=defaults.cache_ram_mib, metavar="MIB",
                        help="prompt cache beyond the slots, in host RAM (MiB; 0 = none; default: 8192 or an eighth "
                             "of this machine's memory)")
    parser.add_argument("--cache-dir", default=None,
                        help="prompt cache on disk, kept across restarts (files checked against model and build)")
    parser.add_argument("--cache-disk", type=int, default=defaults.cache_disk_mib, metavar="MIB",
                        help="the most --cache-dir holds (MiB), least recently used evicted")
    parser.add_argument("--speculative", default=defaults.speculative, choices=SPECULATIVE_MODES,
                        help="speculative decoding: ngram drafts tokens by prompt lookup, draft with a small model "
                             "(--draft-model), and each step verifies them, only where that pays (see "
                             "docs/benchmarks.md)")
    parser.add_argument("--draft-model", default=None, metavar="PATH",
                        help="--speculative draft: a GGUF file sharing the model's vocabulary, or 'default' for the "
                             "embedded model")
    parser.add_argument("--draft-max", type=int, default=defaults.draft_max,
                        help="most drafted tokens per request and step")
    parser.add_argument("--draft-min", type=int, default=defaults.draft_min,
                        help="fewest drafted tokens per speculating request and step, even where the cost model "
                             "says they do not pay (default 0: the cost model decides; = --draft-max fixes the length)")
    parser.add_argument("--ngram-min", type=int, default=defaults.ngram_min,
                        help="shortest match (tokens) that prompt lookup continues")


def _engine_config(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(
        model=args.model, ctx=args.ctx, parallel=args.parallel, threads=args.threads,
        batch_tokens=args.batch, max_waiting=args.max_waiting, energy_meter=args.energy_meter,
        cpu_tdp_w=args.cpu_tdp_w, flash_attn=args.flash_attn, deterministic=args.deterministic,
        cache_ram_mib=args.cache_ram, cache_dir=args.cache_dir, cache_disk_mib=args.cache_disk,
        speculative=args.speculative, draft_max=args.draft_max, draft_min=args.draft_min, ngram_min=args.ngram_min,
        draft_model=args.draft_model,
    )


def _generate(args: argparse.Namespace) -> int:
    from qanat.build import build_llamacpp_engine
    from qanat.engine.client import ChatPrompt, Prompt, TextPrompt
    from qanat.engine.sampling import SamplingParams

    engine = build_llamacpp_engine(_engine_config(args))
    params = SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens, seed=args.seed)
    prompt: Prompt = (
        TextPrompt(args.prompt) if args.raw else ChatPrompt(({"role": "user", "content": args.prompt},))
    )

    async def run() -> None:
        async for delta in engine.generate(prompt, params):
            print(delta.text, end="", flush=True)
        print()

    try:
        asyncio.run(run())
    finally:
        engine.shutdown()
    return 0


def _serve(args: argparse.Namespace) -> int:
    from qanat.serving.run import serve

    keys = list(args.api_key or [])
    keys += [k.strip() for k in os.environ.get("QANAT_API_KEYS", "").split(",") if k.strip()]
    carbon = CarbonModel.for_grid(args.grid, pue=args.pue, intensity_g_per_kwh=args.grid_intensity)
    server_config = ServerConfig(host=args.host, port=args.port, api_keys=tuple(keys),
                                 drain_timeout_s=args.drain_timeout, carbon=carbon, webui=not args.no_webui)
    return serve(_engine_config(args), server_config, args.config, args.guardrails)


def _config(args: argparse.Namespace) -> int:
    from qanat.router.config import load_config_file

    loaded = load_config_file(args.file)  # ConfigError: printed by main with the line and the field
    if loaded.guardrails is not None:
        print(f"guardrails: input {loaded.guardrails.input}; output {loaded.guardrails.output}")
    for model in loaded.spec.models:
        replicas = ", ".join(f"{r.name} ({'local ' + str(r.gguf) if r.is_local else r.url})" for r in model.replicas)
        print(f"{model.name}: {model.policy} over {replicas}")
    print(f"{args.file}: OK")
    return 0


def _energy(args: argparse.Namespace) -> int:
    import time

    from qanat.energy.meters import CpuTimeEstimateMeter, open_meter, probe_meters

    for probe in probe_meters():
        print(f"{probe.name:9} {probe.source:20} {'readable' if probe.readable else 'not readable':13} {probe.detail}")
    meter = open_meter("auto", args.cpu_tdp_w)
    start_j, start_s = meter.read_joules(), time.monotonic()
    time.sleep(args.interval)
    power_w = (meter.read_joules() - start_j) / (time.monotonic() - start_s)
    line = f"in use: {meter.source}; power now {power_w:.2f} W"
    if isinstance(meter, CpuTimeEstimateMeter):
        line += f" (this process's busy power; idle {meter.idle_w:.1f} W is reported apart, charged to no request)"
    print(line)
    return 0


def _bench(args: argparse.Namespace) -> int:
    from qanat.bench.metrics import Slo
    from qanat.bench.report import compare_markdown, summary_markdown, write_result
    from qanat.bench.runner import BenchConfig, BenchError, run_bench
    from qanat.bench.workload import WorkloadSpec

    if args.action:
        if args.action[0] != "compare" or len(args.action) < 3:
            print("usage: qanat bench compare A/result.json B/result.json [...]", file=sys.stderr)
            return 2
        try:
            print(compare_markdown([Path(p) for p in args.action[1:]]), end="")
        except ValueError as e:
            print(f"qanat bench: {e}", file=sys.stderr)
            return 2
        return 0
    if not args.url:
        print("qanat bench: --url is required (an OpenAI-compatible base URL)", file=sys.stderr)
        return 2
    if args.turns:
        return _bench_conversations(args)
    try:
        config = BenchConfig(
            url=args.url, model=args.model, api_key=args.api_key, endpoint=args.endpoint,
            concurrency=tuple(int(c) for c in args.concurrency.split(",")) if args.concurrency else (
                (1, 2, 4, 8, 16, 32, 64) if args.sweep else ()),
            rate=tuple(float(r) for r in args.rate.split(",")) if args.rate else (),
            duration_s=args.duration, ignore_eos=not args.no_ignore_eos, tokenizer=args.tokenizer,
            slo=Slo.parse(args.slo) if args.slo else None, timeout_s=args.timeout,
            workload=WorkloadSpec(
                num_requests=args.num_requests, input_tokens=args.input_tokens, output_tokens=args.output_tokens,
                shared_prefix_tokens=args.shared_prefix, dataset=args.dataset, seed=args.seed,
                output_jitter=args.output_jitter if args.output_jitter is not None else (0.5 if args.sweep else 0.0),
            ),
        )
        if args.sweep:
            from qanat.bench.sweep import run_sweep

            result = run_sweep(config, args.sweep_max_input, show_progress=not args.quiet)
        else:
            result = run_bench(config, show_progress=not args.quiet)
    except (ValueError, BenchError, FileNotFoundError) as e:
        print(f"qanat bench: {e}", file=sys.stderr)
        return 2
    print(summary_markdown(result), end="")
    if args.out:
        for path in write_result(result, Path(args.out)):
            print(f"wrote {path}", file=sys.stderr)
    failed = sum(run["aggregate"]["failed"] for run in result["runs"])
    return 1 if failed and not any(run["aggregate"]["completed"] for run in result["runs"]) else 0


def _bench_conversations(args: argparse.Namespace) -> int:
    """`qanat bench --turns T --conversations N`: the multi-turn workload."""
    import json
    from dataclasses import asdict

    from qanat.bench.conversation import (
        ConversationSpec,
        conversations_markdown,
        records_json,
        run_conversations,
        summarize_turns,
    )
    from qanat.bench.runner import BenchConfig, BenchError, _resolve_model

    try:
        spec = ConversationSpec(conversations=args.conversations, turns=args.turns,
                                output_tokens=args.output_tokens, seed=args.seed)
        concurrency = int((args.concurrency or str(spec.conversations)).split(",")[0])
        config = BenchConfig(url=args.url, model=args.model, api_key=args.api_key, concurrency=(concurrency,))
        model = _resolve_model(config)
    except (ValueError, BenchError) as e:
        print(f"qanat bench: {e}", file=sys.stderr)
        return 2
    records, wall_s = asyncio.run(run_conversations(config.base_url, model, spec, concurrency, config.headers,
                                                    args.timeout, ignore_eos=not args.no_ignore_eos))
    summary = summarize_turns(records, wall_s)
    print(conversations_markdown(summary), end="")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "conversations.json").write_text(json.dumps({"spec": asdict(spec),
                                                            "summary": summary, "turns": records_json(records)},
                                                           indent=1))
        print(f"wrote {out / 'conversations.json'}", file=sys.stderr)
    return 0 if summary["completed"] else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="qanat", description="Qanat: an open inference factory for any chip")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="serve a model behind an OpenAI-compatible API")
    _add_engine_args(serve)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--api-key", action="append",
                       help="require this bearer key (repeatable; QANAT_API_KEYS adds comma-separated keys)")
    serve.add_argument("--drain-timeout", type=float, default=30.0,
                       help="seconds in-flight requests get to finish after SIGTERM")
    serve.add_argument("--grid", default="WORLD", help="grid for CO2 figures: FR, MA, US, WORLD")
    serve.add_argument("--grid-intensity", type=float, default=None, help="gCO2e/kWh, overrides --grid's value")
    serve.add_argument("--pue", type=float, default=1.0, help="data-centre power usage effectiveness")
    serve.add_argument("--config", help="qanat.yaml: serve every model it lists, over its replicas")
    serve.add_argument("--no-webui", action="store_true", help="do not serve the chat playground and dashboard at /")
    serve.add_argument("--guardrails", metavar="FILE",
                       help="guardrails policy (YAML): input and output rails, language allow-list, blocked topics; "
                            "overrides a --config file's guardrails section")
    serve.set_defaults(run=_serve)

    config = commands.add_parser("config", help="config check FILE: validate a qanat.yaml without serving")
    config.add_argument("action", choices=["check"])
    config.add_argument("file")
    config.set_defaults(run=_config)

    energy = commands.add_parser("energy", help="which energy meters exist here, which are readable, power now")
    energy.add_argument("--cpu-tdp-w", type=float, default=None)
    energy.add_argument("--interval", type=float, default=1.0, help="seconds to sample power over")
    energy.set_defaults(run=_energy)

    generate = commands.add_parser("generate", help="generate text for one prompt, in-process")
    _add_engine_args(generate)
    generate.add_argument("prompt")
    generate.add_argument("--max-tokens", type=int, default=128)
    generate.add_argument("--temperature", type=float, default=0.0)
    generate.add_argument("--seed", type=int, default=None)
    generate.add_argument("--raw", action="store_true", help="send the prompt as is, without the chat template")
    generate.set_defaults(run=_generate)

    bench = commands.add_parser("bench", help="measure an OpenAI-compatible endpoint; or: bench compare A B")
    bench.add_argument("action", nargs="*", help="compare RESULT.json RESULT.json ...")
    bench.add_argument("--url", help="OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1")
    bench.add_argument("--model", help="model id (default: the first one the target lists)")
    bench.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"))
    bench.add_argument("--endpoint", choices=["chat", "completions"], default="chat")
    bench.add_argument("--concurrency", help="closed loop: comma-separated concurrencies, e.g. 1,4,16")
    bench.add_argument("--rate", help="open loop: comma-separated Poisson request rates per second")
    bench.add_argument("--num-requests", type=int, default=64)
    bench.add_argument("--duration", type=float, default=None, help="seconds per load instead of --num-requests")
    bench.add_argument("--input-tokens", type=int, default=200)
    bench.add_argument("--output-tokens", type=int, default=128)
    bench.add_argument("--shared-prefix", type=int, default=0, help="tokens common to every prompt")
    bench.add_argument("--output-jitter", type=float, default=None,
                       help="spread output lengths uniformly in [1-F, 1+F] x --output-tokens (default 0; 0.5 with "
                            "--sweep): fixed lengths make a closed loop run in synchronised waves")
    bench.add_argument("--dataset", choices=["synthetic", "multilingual"], default="synthetic")
    bench.add_argument("--seed", type=int, default=0)
    bench.add_argument("--no-ignore-eos", action="store_true", help="let the model stop early")
    bench.add_argument("--tokenizer", default="auto", help="auto | none | PATH.gguf, for exact prompt lengths")
    bench.add_argument("--slo", help="goodput objectives, e.g. ttft=500ms,tpot=50ms")
    bench.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    bench.add_argument("--out", help="directory for result.json, summary.md and plots")
    bench.add_argument("--quiet", action="store_true", help="no progress bar")
    bench.add_argument("--sweep", action="store_true",
                       help="the runs `qanat plan --calibrate` needs: prefill at 4 prompt lengths, decode at each "
                            "--concurrency (default 1,2,4,8,16,32,64) at short and long context, power")
    bench.add_argument("--sweep-max-input", type=int, default=1024, help="longest prompt of --sweep, in tokens")
    bench.add_argument("--turns", type=int, default=0,
                       help="multi-turn workload: each conversation sends this many turns, each re-sending the history "
                            "and the previous answer (reports TTFT per turn; --concurrency bounds requests in flight)")
    bench.add_argument("--conversations", type=int, default=16, help="conversations of the multi-turn workload")
    bench.set_defaults(run=_bench)

    plan = commands.add_parser("plan", help="which chip, how many, at what latency, joules and price (predicted)")
    from qanat.planner.cli import add_plan_args, run_plan

    add_plan_args(plan)
    plan.set_defaults(run=run_plan)

    args = parser.parse_args(argv)
    try:
        return int(args.run(args))
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"qanat: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

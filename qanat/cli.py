"""One entry point: `qanat serve | generate`."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

from qanat.config import ConfigError, EngineConfig, ServerConfig


def _add_engine_args(parser: argparse.ArgumentParser) -> None:
    defaults = EngineConfig()
    parser.add_argument("--model", default=None, help="GGUF file (default: embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--ctx", type=int, default=defaults.ctx, help="context tokens per request")
    parser.add_argument("--parallel", type=int, default=defaults.parallel, help="sequences decoded together")
    parser.add_argument("--threads", type=int, default=defaults.threads, help="CPU threads for llama.cpp")
    parser.add_argument("--batch", type=int, default=defaults.batch_tokens, help="max tokens per forward pass")
    parser.add_argument("--max-waiting", type=int, default=defaults.max_waiting,
                        help="requests queued beyond the parallel slots before answering 429")


def _engine_config(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(
        model=args.model, ctx=args.ctx, parallel=args.parallel, threads=args.threads,
        batch_tokens=args.batch, max_waiting=args.max_waiting,
    )


def _generate(args: argparse.Namespace) -> int:
    from qanat.engine.engine import Engine
    from qanat.engine.types import SamplingParams

    engine = Engine(_engine_config(args))
    params = SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens, seed=args.seed)
    prompt_ids = (
        engine.tokenize(args.prompt) if args.raw
        else engine.chat_prompt_ids([{"role": "user", "content": args.prompt}])
    )

    async def run() -> None:
        async for delta in engine.generate(prompt_ids, params):
            print(delta.text, end="", flush=True)
        print()

    try:
        asyncio.run(run())
    finally:
        engine.shutdown()
    return 0


def _serve(args: argparse.Namespace) -> int:
    from qanat.server.run import serve

    keys = list(args.api_key or [])
    keys += [k.strip() for k in os.environ.get("QANAT_API_KEYS", "").split(",") if k.strip()]
    server_config = ServerConfig(host=args.host, port=args.port, api_keys=tuple(keys),
                                 drain_timeout_s=args.drain_timeout)
    return serve(_engine_config(args), server_config)


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
    serve.set_defaults(run=_serve)

    generate = commands.add_parser("generate", help="generate text for one prompt, in-process")
    _add_engine_args(generate)
    generate.add_argument("prompt")
    generate.add_argument("--max-tokens", type=int, default=128)
    generate.add_argument("--temperature", type=float, default=0.0)
    generate.add_argument("--seed", type=int, default=None)
    generate.add_argument("--raw", action="store_true", help="send the prompt as is, without the chat template")
    generate.set_defaults(run=_generate)

    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (ConfigError, FileNotFoundError) as e:
        print(f"qanat: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

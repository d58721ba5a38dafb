"""Router benchmarks (issue 12). Each starts its own servers on 127.0.0.1 and stops them.

    .venv/bin/python bench/router_bench.py latency    # added latency in front of an instant stub upstream
    .venv/bin/python bench/router_bench.py prefix     # prefix vs round_robin, two local replicas, shared prompts
    .venv/bin/python bench/router_bench.py failover   # SIGKILL a replica under steady streamed load
    .venv/bin/python bench/router_bench.py overload   # twice the replicas' capacity: answers or 429s, no 5xx

Prints Markdown for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.servers import Server  # noqa: E402
from qanat.bench.loadgen import run_load  # noqa: E402
from qanat.bench.metrics import percentile  # noqa: E402

PY = sys.executable
STUB = Path(__file__).resolve().parent / "stub_openai.py"


def serve_config(yaml_text: str, cpus: str | None = None) -> Server:
    """`qanat serve --config`, ready once every model's replicas are (its /ready)."""
    path = Path(tempfile.mkdtemp()) / "qanat.yaml"
    path.write_text(yaml_text)
    return Server("router", _pin([PY, "-m", "qanat.cli", "serve", "--config", str(path)], cpus), ready_path="/ready")


def chat(model: str, content: str, max_tokens: int, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
            "temperature": 0, "stream_options": {"include_usage": True}, **extra}


def ms(values: list[float], q: float) -> float:
    return 1000 * (percentile(values, q) or 0.0)


# -- added latency ----------------------------------------------------------------------------------------


async def ttfb_load(url: str, bodies: list[dict[str, Any]], concurrency: int) -> list[float]:
    """Time to the first byte of each streamed answer's body, `concurrency` requests at a time, with aiohttp and
    no parsing: a load generator as light as Python allows, since it shares the cores with what it measures.
    Each answer is read to its end and must end with [DONE]."""
    import aiohttp

    queue = list(reversed(bodies))
    ttfb_s: list[float] = []

    async def worker(session: aiohttp.ClientSession) -> None:
        while queue:
            body = json.dumps({**queue.pop(), "stream": True}).encode()
            started = time.perf_counter()
            async with session.post(url, data=body, headers={"content-type": "application/json"}) as response:
                first = await response.content.readany()
                ttfb_s.append(time.perf_counter() - started)
                rest = await response.read()
                assert response.status == 200 and (first + rest).endswith(b"data: [DONE]\n\n"), first + rest

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
    return ttfb_s


def latency(requests: int, concurrency: int, upstream_delay_ms: float) -> None:
    """Two layouts: every process free to use both cores (they contend: at concurrency 16 the whole loop is
    CPU-bound, so the router's CPU per request shows up multiplied), and the router alone on core 1 with the stub
    and the load generator on core 0, as a router on its own core sees it; direct runs use the same layout."""
    bodies = [chat("stub", f"q{i}", 16) for i in range(requests)]
    for pinned in (False, True):
        client_cpus, router_cpus = ({0}, "1") if pinned else (os.sched_getaffinity(0), None)
        stub = Server("stub", _pin([PY, str(STUB), "--delay-ms", str(upstream_delay_ms)], "0" if pinned else None))
        router = serve_config(f"""models:
  - name: stub
    policy: least_load
    replicas:
      - name: up
        url: {stub.url}/v1
        model: stub
        parallel: {concurrency}
""", cpus=router_cpus)
        before = os.sched_getaffinity(0)
        os.sched_setaffinity(0, client_cpus)
        try:
            rounds: dict[str, list[float]] = {"direct": [], "router": []}
            router_cpu_s = 0.0
            for turn in ("direct", "router") * 3:
                url = (stub.url if turn == "direct" else router.url) + "/v1/chat/completions"
                cpu_before_s = router.cpu_s()
                rounds[turn] += asyncio.run(ttfb_load(url, bodies, concurrency))[concurrency:]  # after warm-up
                router_cpu_s += router.cpu_s() - cpu_before_s if turn == "router" else 0.0
            direct, routed = rounds["direct"], rounds["router"]
            layout = "router on core 1; stub and load generator on core 0" if pinned else "no pinning, 2 cores"
            print(f"\n{layout}: {requests} streamed requests x 3 rounds each (first {concurrency} of each round "
                  f"left out), concurrency {concurrency}, upstream's first byte after {upstream_delay_ms:g} ms, "
                  f"time to first byte")
            print("| | p50 ms | p90 ms | p99 ms |")
            print("|---|---|---|---|")
            print(f"| direct to the stub | {ms(direct, 50):.2f} | {ms(direct, 90):.2f} | {ms(direct, 99):.2f} |")
            print(f"| through the router | {ms(routed, 50):.2f} | {ms(routed, 90):.2f} | {ms(routed, 99):.2f} |")
            print(f"| added | {ms(routed, 50) - ms(direct, 50):.2f} | {ms(routed, 90) - ms(direct, 90):.2f} | "
                  f"{ms(routed, 99) - ms(direct, 99):.2f} |")
            text = httpx.get(f"{router.url}/metrics").text
            total = next(x for x in text.splitlines() if x.startswith("qanat_router_overhead_seconds_sum"))
            count = next(x for x in text.splitlines() if x.startswith("qanat_router_overhead_seconds_count"))
            mean_us = 1e6 * float(total.split()[-1]) / float(count.split()[-1])
            print(f"the router's own work before the replica gets a request (qanat_router_overhead_seconds): "
                  f"mean {mean_us:.0f} µs; router CPU per request {1e3 * router_cpu_s / (3 * requests):.2f} ms")
        finally:
            os.sched_setaffinity(0, before)
            router.stop()
            stub.stop()


def _pin(args: list[str], cpus: str | None) -> list[str]:
    return ["taskset", "-c", cpus, *args] if cpus else args


# -- prefix ---------------------------------------------------------------------------------------------


def local_pair(policy: str, deterministic: bool = False, parallel: int = 8, waiting: int = 256) -> Server:
    replica = """      - name: {name}
        gguf: default
        parallel: {parallel}
        max_waiting: {waiting}
        ctx: 1024
        threads: 1
        deterministic: {det}
"""
    replicas = "".join(replica.format(name=n, parallel=parallel, waiting=waiting, det=str(deterministic).lower())
                       for n in ("a", "b"))
    return serve_config(f"models:\n  - name: smollm2\n    policy: {policy}\n    replicas:\n{replicas}")


def prefix(requests: int, concurrency: int, parallel: int) -> None:
    rng = random.Random(7)
    words = ["water", "well", "channel", "oasis", "mountain", "field", "palm", "stone", "shaft", "gravity",
             "slope", "village", "share"]
    systems = [" ".join(rng.choice(words) for _ in range(230)) for _ in range(4)]  # ~300 tokens each
    bodies = []
    for i in range(requests):
        body = chat("smollm2", f"Question {i}: what is {rng.choice(words)} number {i}?", 32, ignore_eos=True)
        # In random order: system prompts taking turns would line up with round robin's turns by accident.
        body["messages"].insert(0, {"role": "system", "content": rng.choice(systems)})
        bodies.append(body)
    rows = []
    for policy in ("round_robin", "prefix", "round_robin", "prefix"):
        server = local_pair(policy, parallel=parallel)
        try:
            records, wall = asyncio.run(run_load(f"{server.url}/v1/chat/completions", bodies,
                                                 concurrency=concurrency))
        finally:
            server.stop()
        ok = [r for r in records if r.ok]
        ttft = [r.ttft_s for r in ok if r.ttft_s is not None]
        cached = sum(r.cached_tokens or 0 for r in ok)
        rows.append((policy, statistics.mean(ttft), sum(r.output_tokens for r in ok) / wall, cached, len(ok)))
    print(f"{requests} requests, 4 system prompts of ~300 tokens, concurrency {concurrency}, 32 new tokens, "
          f"2 replicas x {parallel} slots")
    print("| policy | mean TTFT (s) | output tok/s | cached prompt tokens | ok |")
    print("|---|---|---|---|---|")
    for policy, mean_ttft, tps, cached, n_ok in rows:
        print(f"| {policy} | {mean_ttft:.2f} | {tps:.1f} | {cached} | {n_ok} |")


# -- failover -------------------------------------------------------------------------------------------


def failover(requests: int, concurrency: int) -> None:
    server = local_pair("least_load", deterministic=True, parallel=4)
    try:
        questions = [f"Describe water in {n} sentences." for n in range(requests)]
        bodies = [chat("smollm2", q, 64, ignore_eos=True) for q in questions]
        reference = {}
        with httpx.Client(timeout=300) as http:
            for body in bodies:
                r = http.post(f"{server.url}/v1/chat/completions", json={**body, "stream": False})
                reference[body["messages"][0]["content"]] = r.json()["choices"][0]["message"]["content"]
            replicas = http.get(f"{server.url}/v1/models").json()["data"][0]["replicas"]
        victim = replicas[0]
        texts: dict[str, str] = {}

        async def one(client: httpx.AsyncClient, body: dict[str, Any]) -> None:
            parts = []
            async with client.stream("POST", f"{server.url}/v1/chat/completions", json={**body, "stream": True}
                                     ) as response:
                async for line in response.aiter_lines():
                    if line.startswith("data: {"):
                        payload = json.loads(line[6:])
                        for choice in payload.get("choices", []):
                            parts.append(choice["delta"].get("content") or "")
            texts[body["messages"][0]["content"]] = "".join(parts)

        async def load() -> None:
            async with httpx.AsyncClient(timeout=300) as client:
                pending = list(bodies)

                async def worker() -> None:
                    while pending:
                        await one(client, pending.pop(0))

                async def killer() -> None:
                    await asyncio.sleep(3.0)
                    os.kill(victim["executor_pid"], signal.SIGKILL)

                await asyncio.gather(killer(), *(worker() for _ in range(concurrency)))

        start = time.perf_counter()
        asyncio.run(load())
        wall = time.perf_counter() - start
        same = sum(texts.get(q) == reference[q] for q in reference)
        metrics = httpx.get(f"{server.url}/metrics").text
        outcomes = [x for x in metrics.splitlines() if x.startswith("qanat_router_requests_total")]
        print(f"{requests} streamed requests (64 tokens, greedy, deterministic replicas), concurrency {concurrency}; "
              f"replica {victim['name']}'s executor SIGKILLed 3 s in; {wall:.0f} s in all")
        print(f"- completed with the text they have without the kill: {same} of {requests}")
        for x in outcomes:
            print(f"- {x}")
    finally:
        server.stop()


# -- overload -------------------------------------------------------------------------------------------


def overload(requests: int) -> None:
    server = local_pair("least_load", parallel=2, waiting=2)  # capacity: 2 x (2 running + 2 waiting) = 8
    try:
        bodies = [chat("smollm2", f"Count to {i}.", 48, ignore_eos=True) for i in range(requests)]
        statuses: list[int] = []
        retry_after: list[str | None] = []

        async def one(client: httpx.AsyncClient, body: dict[str, Any]) -> None:
            r = await client.post(f"{server.url}/v1/chat/completions", json=body)
            statuses.append(r.status_code)
            retry_after.append(r.headers.get("retry-after"))

        async def burst() -> None:
            async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=requests)) as client:
                await asyncio.gather(*(one(client, b) for b in bodies))

        asyncio.run(burst())
        counts = {s: statuses.count(s) for s in sorted(set(statuses))}
        ok_429 = all(a is not None for s, a in zip(statuses, retry_after, strict=True) if s == 429)
        print(f"{requests} requests at once against 2 replicas x (2 running + 2 waiting) = 8 places")
        print(f"- statuses: {counts}; every 429 has Retry-After: {ok_429}")
    finally:
        server.stop()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("what", choices=["latency", "prefix", "failover", "overload"])
    parser.add_argument("--requests", type=int, default=None)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--parallel", type=int, default=8, help="slots per local replica (prefix)")
    parser.add_argument("--upstream-delay-ms", type=float, default=0.0,
                        help="the stub's time to first byte (latency); 0 answers at once")
    args = parser.parse_args()
    if args.what == "latency":
        latency(args.requests or 1000, args.concurrency, args.upstream_delay_ms)
    elif args.what == "prefix":
        prefix(args.requests or 48, args.concurrency, args.parallel)
    elif args.what == "failover":
        failover(args.requests or 16, args.concurrency)
    else:
        overload(args.requests or 16)
    return 0


if __name__ == "__main__":
    sys.exit(main())


"""`qanat bench`: drive a sweep of loads against one endpoint and gather a versioned result."""

from __future__ import annotations

import asyncio
import datetime as dt
import platform
import socket
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from qanat import __version__
from qanat.bench.loadgen import RequestRecord, run_load
from qanat.bench.metrics import Slo, aggregate
from qanat.bench.report import SCHEMA_VERSION
from qanat.bench.workload import Prompt, Tokenizer, WorkloadSpec, build_prompts


class BenchError(RuntimeError):
    """A run that cannot start (unreachable target, unknown model): a clear message, not a traceback."""


@dataclass(frozen=True)
class BenchConfig:
    url: str  # base URL, e.g. http://127.0.0.1:8000/v1
    model: str | None = None  # None = the first model the target lists
    api_key: str | None = None
    endpoint: str = "chat"  # or "completions"
    concurrency: tuple[int, ...] = ()
    rate: tuple[float, ...] = ()
    duration_s: float | None = None
    ignore_eos: bool = True
    tokenizer: str = "auto"  # auto | none | PATH to a GGUF whose vocabulary matches the target's model
    slo: Slo | None = None
    timeout_s: float = 600.0
    workload: WorkloadSpec = field(default_factory=WorkloadSpec)

    def __post_init__(self) -> None:
        if self.endpoint not in ("chat", "completions"):
            raise ValueError(f"--endpoint must be 'chat' or 'completions', got {self.endpoint!r}")
        if bool(self.concurrency) == bool(self.rate):
            raise ValueError("give exactly one of --concurrency or --rate")
        if any(c < 1 for c in self.concurrency) or any(r <= 0 for r in self.rate):
            raise ValueError("--concurrency values must be >= 1 and --rate values > 0")

    @property
    def base_url(self) -> str:
        url = self.url.rstrip("/")
        return url if url.endswith("/v1") else url + "/v1"

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}


def _resolve_model(config: BenchConfig) -> str:
    try:
        response = httpx.get(f"{config.base_url}/models", headers=config.headers, timeout=10)
    except httpx.HTTPError as e:
        raise BenchError(f"cannot reach {config.base_url}: {e}") from e
    if config.model is not None:
        return config.model
    if response.status_code != 200:
        raise BenchError(f"GET {config.base_url}/models answered {response.status_code}: {response.text[:200]}; "
                         "pass --model")
    try:
        return str(response.json()["data"][0]["id"])
    except (ValueError, KeyError, IndexError) as e:
        raise BenchError(f"GET {config.base_url}/models listed no model; pass --model") from e


def _tokenizer(config: BenchConfig, model_id: str) -> Tokenizer | None:
    if config.tokenizer == "none":
        return None
    from qanat.build import load_gguf_tokenizer
    from qanat.models.locate import DEFAULT_MODEL_ID, default_model_path

    if config.tokenizer == "auto":
        # The embedded model's vocabulary is exact only for that model; anything else gets estimates.
        return load_gguf_tokenizer(default_model_path()) if model_id == DEFAULT_MODEL_ID else None
    return load_gguf_tokenizer(Path(config.tokenizer))


def _body(config: BenchConfig, model_id: str, prompt: Prompt) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": model_id,
        "max_tokens": prompt.output_tokens or config.workload.output_tokens,
        "temperature": 0,
        "stream_options": {"include_usage": True},
    }
    if config.ignore_eos:
        body["ignore_eos"] = True  # vLLM, SGLang, llama.cpp and qanat honour it; others ignore it
    if config.endpoint == "chat":
        body["messages"] = [{"role": "user", "content": prompt.text}]
    else:
        body["prompt"] = prompt.text
    return body


def run_bench(config: BenchConfig, show_progress: bool = True) -> dict[str, Any]:
    model_id = _resolve_model(config)
    tokenizer = _tokenizer(config, model_id)
    prompts = build_prompts(config.workload, tokenizer)
    bodies = [_body(config, model_id, p) for p in prompts]
    url = f"{config.base_url}/{'chat/completions' if config.endpoint == 'chat' else 'completions'}"
    mode = "closed" if config.concurrency else "open"
    loads: list[float] = list(config.concurrency or config.rate)
    started = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    runs = []
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("{task.fields[errors]} errors"), disable=not show_progress) as progress:
        for load in loads:
            total = None if config.duration_s else len(bodies)
            task = progress.add_task(f"{mode} {load}", total=total, errors=0)

            def done(record: RequestRecord, task: Any = task) -> None:
                progress.advance(task)
                if not record.ok:
                    progress.update(task, errors=progress.tasks[task].fields["errors"] + 1)

            records, wall = asyncio.run(run_load(
                url, bodies, concurrency=int(load) if mode == "closed" else None,
                rate=float(load) if mode == "open" else None, duration_s=config.duration_s,
                headers=config.headers, timeout_s=config.timeout_s, seed=config.workload.seed, on_done=done,
            ))
            records.sort(key=lambda r: r.index)
            runs.append({
                "load": load,
                "aggregate": aggregate(records, wall, config.slo),
                "requests": [asdict(r) | {"itl_s": r.itl_s, "tpot_s": r.tpot_s} for r in records],
            })
    return {
        "schema_version": SCHEMA_VERSION,
        "config": {
            "url": config.base_url, "model": model_id, "endpoint": config.endpoint, "mode": mode,
            "loads": loads, "duration_s": config.duration_s, "ignore_eos": config.ignore_eos,
            "prompt_lengths_exact": tokenizer is not None, "slo": config.slo.as_dict() if config.slo else None,
            "workload": asdict(config.workload),
        },
        "environment": {
            "qanat_version": __version__, "python": platform.python_version(), "platform": platform.platform(),
            "host": socket.gethostname(), "started_at": started,
        },
        "prompts": [asdict(p) for p in prompts],
        "runs": runs,
    }

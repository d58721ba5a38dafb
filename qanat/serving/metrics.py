"""Prometheus metrics, named after vLLM's where one exists. One registry per app, so tests can run several."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from qanat.engine.client import EngineStats
from qanat.router.metrics import RouterMetrics


class StatsSource(Protocol):
    def stats(self) -> EngineStats: ...


_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 60, 120)


class _EngineCollector(Collector):
    """Reads the engine's live state at scrape time."""

    def __init__(self, engine: StatsSource) -> None:
        self.engine = engine

    def collect(self) -> Iterator[Metric]:
        stats = self.engine.stats()
        load = stats.load
        yield GaugeMetricFamily("qanat_num_requests_running", "Requests holding a KV slot", load.num_running)
        yield GaugeMetricFamily("qanat_num_requests_waiting", "Requests queued for a slot", load.num_waiting)
        yield GaugeMetricFamily("qanat_kv_cache_usage_ratio", "Fraction of KV cells held by running requests",
                                load.kv_usage)
        yield CounterMetricFamily("qanat_executor_restarts", "Executor processes restarted after dying",
                                  stats.executor_restarts)
        yield CounterMetricFamily("qanat_engine_steps", "Engine steps run", stats.steps)
        yield CounterMetricFamily("qanat_engine_step_seconds", "Wall time of engine steps, executor included",
                                  stats.step_s)
        yield CounterMetricFamily("qanat_executor_boundary_seconds",
                                  "Of the step time: crossing the executor's process boundary", stats.boundary_s)
        yield CounterMetricFamily("qanat_prefix_cache_hit_tokens", "Prompt tokens reused from the prefix cache",
                                  stats.prefix_cache_hit_tokens)
        yield CounterMetricFamily("qanat_prefix_cache_query_tokens", "Prompt tokens looked up in the prefix cache",
                                  stats.prompt_tokens)
        yield CounterMetricFamily("qanat_spec_decode_num_drafts", "Speculative verifications with drafted tokens",
                                  stats.spec_drafts)
        yield CounterMetricFamily("qanat_spec_decode_num_draft_tokens", "Drafted tokens verified",
                                  stats.spec_draft_tokens)
        yield CounterMetricFamily("qanat_spec_decode_num_accepted_tokens", "Drafted tokens kept",
                                  stats.spec_accepted_tokens)
        drafted = stats.spec_draft_tokens
        yield GaugeMetricFamily("qanat_spec_decode_draft_acceptance_rate", "Drafted tokens kept / drafted, since start",
                                stats.spec_accepted_tokens / drafted if drafted else 0.0)
        energy = stats.energy
        joules = CounterMetricFamily("qanat_energy_joules", "Energy since start: charged to requests, or idle",
                                     labels=["source", "kind"])
        joules.add_metric([energy.source, "requests"], energy.attributed_j)
        joules.add_metric([energy.source, "idle"], energy.idle_j)
        yield joules
        per_joule = GaugeMetricFamily("qanat_tokens_per_joule", "Tokens processed per joule charged to requests",
                                      labels=["source"])
        per_joule.add_metric([energy.source], energy.tokens / energy.attributed_j if energy.attributed_j else 0.0)
        yield per_joule


class ServerMetrics:
    def __init__(self, engine: StatsSource) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(engine))
        r = self.registry
        self.requests = Counter("qanat_requests", "HTTP requests by route and status", ["route", "status"],
                                registry=r)
        self.ttft = Histogram("qanat_time_to_first_token_seconds", "Time to first token", buckets=_LATENCY_BUCKETS,
                              registry=r)
        self.itl = Histogram("qanat_inter_token_latency_seconds", "Time between output tokens",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("qanat_e2e_request_latency_seconds", "End-to-end request latency",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.queue_time = Histogram("qanat_request_queue_time_seconds", "Time waiting for a KV slot",
                                    buckets=_LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("qanat_prompt_tokens", "Prompt tokens processed", registry=r)
        self.generation_tokens = Counter("qanat_generation_tokens", "Tokens generated", registry=r)
        self.tool_calls = Counter("qanat_tool_calls", "Tool calls returned, by tool_choice (auto, required, named)",
                                  ["tool_choice"], registry=r)
        self.tool_call_failures = Counter(
            "qanat_tool_call_failures", "Outputs whose tool calls did not parse or validate (under auto: sent as text)",
            ["tool_choice"], registry=r)

    def include(self, router_metrics: RouterMetrics) -> None:
        """Serve a router's families from this app's /metrics too."""
        self.registry.register(router_metrics.registry)

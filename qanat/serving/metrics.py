"""Prometheus metrics, named after vLLM's where one exists. One registry per app, so tests can run several."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from qanat.engine.client import EngineStats, PromptCacheStats
from qanat.router.metrics import RouterMetrics


class StatsSource(Protocol):
    def stats(self) -> EngineStats: ...


_GUARD_BUCKETS = (5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05, 0.1)
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
        if stats.prompt_cache is not None:
            yield from _prompt_cache_families(stats.prompt_cache)


def _prompt_cache_families(cache: PromptCacheStats) -> Iterator[Metric]:
    """The prompt cache per tier: slot (hot), ram (warm), disk (cold). Tiers are asked in that order, each for the
    prompt tokens the faster ones did not give, so a tier's hits + misses are the tokens it was asked for."""
    def per_tier(family: CounterMetricFamily | GaugeMetricFamily, values: Mapping[str, float]
                 ) -> CounterMetricFamily | GaugeMetricFamily:
        for tier, value in values.items():
            family.add_metric([tier], value)
        return family

    yield per_tier(CounterMetricFamily("qanat_prompt_cache_hit_tokens", "Prompt tokens reused from this tier",
                                       labels=["tier"]), cache.hit_tokens)
    yield per_tier(CounterMetricFamily("qanat_prompt_cache_miss_tokens",
                                       "Prompt tokens this tier was asked for and did not give", labels=["tier"]),
                   cache.miss_tokens)
    yield per_tier(GaugeMetricFamily("qanat_prompt_cache_bytes", "Bytes of KV this tier holds", labels=["tier"]),
                   cache.held_bytes)
    yield per_tier(GaugeMetricFamily("qanat_prompt_cache_entries", "Saved prefixes this tier holds",
                                     labels=["tier"]), cache.entries)
    yield per_tier(CounterMetricFamily("qanat_prompt_cache_evictions", "Entries evicted (least recently used)",
                                       labels=["tier"]), cache.evictions)
    yield per_tier(CounterMetricFamily("qanat_prompt_cache_restores", "Entries restored into a slot",
                                       labels=["tier"]), cache.restores)
    yield per_tier(CounterMetricFamily("qanat_prompt_cache_restore_seconds",
                                       "Time restoring entries into slots (disk: reading the file included)",
                                       labels=["tier"]), cache.restore_s)
    yield per_tier(CounterMetricFamily("qanat_prompt_cache_restored_tokens", "Tokens restored into slots",
                                       labels=["tier"]), cache.restored_tokens)
    yield CounterMetricFamily("qanat_prompt_cache_saves", "Slots saved before being overwritten", cache.saves)
    yield CounterMetricFamily("qanat_prompt_cache_save_seconds", "Time copying slots' KV out", cache.save_s)
    yield CounterMetricFamily("qanat_prompt_cache_failed_restores",
                              "Restores that failed (the prompt was computed instead)", cache.failed_restores)


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

        self.guardrail_actions = Counter(
            "qanat_guardrail_actions", "Guardrail actions taken, by direction (input, output), category and action",
            ["direction", "category", "action"], registry=r)
        self.guardrail_latency = Histogram(
            "qanat_guardrail_seconds", "Time in guardrails: per request (input, moderation), per release (output)",
            ["direction"], buckets=_GUARD_BUCKETS, registry=r)

    # qanat.guard.rails.GuardRecorder
    def guardrail_action(self, direction: str, category: str, action: str) -> None:
        self.guardrail_actions.labels(direction, category, action).inc()

    def guardrail_seconds(self, direction: str, seconds: float) -> None:
        self.guardrail_latency.labels(direction).observe(seconds)

    def include(self, router_metrics: RouterMetrics) -> None:
        """Serve a router's families from this app's /metrics too."""
        self.registry.register(router_metrics.registry)

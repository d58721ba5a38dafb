"""The router's Prometheus families, registered in the serving app's registry."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 60, 120)
_OVERHEAD_BUCKETS = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2)


class RouterMetrics:
    """Owns its registry; the serving app's registry collects it (a registry is itself a collector)."""

    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "qanat_router_requests", "Requests per replica by outcome: ok, continued (finished a stream another "
            "replica started), failed, full", ["model", "replica", "outcome"], registry=registry)
        self.latency = Histogram("qanat_router_request_seconds", "Request latency on each replica",
                                 ["model", "replica"], buckets=_LATENCY_BUCKETS, registry=registry)
        self.overhead = Histogram("qanat_router_overhead_seconds",
                                  "The router's own time before a replica gets the request (choosing, bookkeeping)",
                                  ["model"], buckets=_OVERHEAD_BUCKETS, registry=registry)
        # Label children by their labels: prometheus' labels() locks and validates on every call, a few µs that a
        # relayed request would pay three times.
        self._counts: dict[tuple[str, str, str], Counter] = {}
        self._latencies: dict[tuple[str, str], Histogram] = {}
        self._overheads: dict[str, Histogram] = {}

    def count(self, model: str, replica: str, outcome: str) -> None:
        key = (model, replica, outcome)
        child = self._counts.get(key)
        if child is None:
            child = self._counts[key] = self.requests.labels(*key)
        child.inc()

    def observe_latency(self, model: str, replica: str, seconds: float) -> None:
        key = (model, replica)
        child = self._latencies.get(key)
        if child is None:
            child = self._latencies[key] = self.latency.labels(*key)
        child.observe(seconds)

    def observe_overhead(self, model: str, seconds: float) -> None:
        child = self._overheads.get(model)
        if child is None:
            child = self._overheads[model] = self.overhead.labels(model)
        child.observe(seconds)

"""The router's Prometheus families, registered in the serving app's registry."""

from __future__ import annotations

import functools

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
        # Each family's children, memoized by label values: prometheus' labels() locks and validates on every
        # call, a few µs that a relayed request would pay three times.
        self.requests_for = functools.cache(self.requests.labels)
        self.latency_for = functools.cache(self.latency.labels)
        self.overhead_for = functools.cache(self.overhead.labels)

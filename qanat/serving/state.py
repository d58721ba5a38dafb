"""The serving app's typed state: one object instead of a dict, found on `app.state.qanat`."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from starlette.requests import HTTPConnection

from qanat.config import ServerConfig
from qanat.energy.accounting import EnergyTotals
from qanat.engine.client import EngineClient, EngineHealth, EngineLoad, EngineStats
from qanat.guard.rails import Guard
from qanat.serving.live import LiveSampler
from qanat.serving.metrics import ServerMetrics


class ModelRegistry:
    """The models this server offers, by the name clients send as "model": an engine or a router each."""

    def __init__(self, engines: dict[str, EngineClient]) -> None:
        assert engines, "a server needs at least one model"
        self._engines = dict(engines)

    @classmethod
    def of(cls, engine: EngineClient) -> ModelRegistry:
        return cls({engine.card.id: engine})

    def get(self, name: str) -> EngineClient | None:
        return self._engines.get(name)

    @property
    def names(self) -> list[str]:
        return list(self._engines)

    def __iter__(self) -> Iterator[EngineClient]:
        return iter(self._engines.values())

    def health(self) -> EngineHealth:
        """Ready when every model can take work."""
        healths = [e.health() for e in self]
        not_ready = [f"{name}: {h.detail}" for name, h in zip(self._engines, healths, strict=True) if not h.ready]
        return EngineHealth(ready=not not_ready, detail="; ".join(not_ready) or "ready",
                            restarts=sum(h.restarts for h in healths),
                            executor_pid=healths[0].executor_pid if len(healths) == 1 else None)

    def stats(self) -> EngineStats:
        """Every engine's stats added up, for the unlabelled gauges of /metrics."""
        parts = [e.stats() for e in self]
        if len(parts) == 1:
            return parts[0]
        sources = sorted({p.energy.source for p in parts})
        loads = [p.load for p in parts]
        return EngineStats(
            load=EngineLoad(sum(x.num_running for x in loads), sum(x.num_waiting for x in loads),
                            sum(x.kv_usage for x in loads) / len(loads)),
            prefix_cache_hit_tokens=sum(p.prefix_cache_hit_tokens for p in parts),
            prompt_tokens=sum(p.prompt_tokens for p in parts),
            energy=EnergyTotals(sources[0] if len(sources) == 1 else "mixed", sum(p.energy.total_j for p in parts),
                                sum(p.energy.attributed_j for p in parts), sum(p.energy.idle_j for p in parts),
                                sum(p.energy.tokens for p in parts)),
            executor_restarts=sum(p.executor_restarts for p in parts), steps=sum(p.steps for p in parts),
            step_s=sum(p.step_s for p in parts), boundary_s=sum(p.boundary_s for p in parts),
            spec_drafts=sum(p.spec_drafts for p in parts), spec_draft_tokens=sum(p.spec_draft_tokens for p in parts),
            spec_accepted_tokens=sum(p.spec_accepted_tokens for p in parts),
        )

    def shutdown(self) -> None:
        for engine in self:
            engine.shutdown()


@dataclass
class Gateway:
    """In-flight API requests and the draining switch. Draining is the app's own business, so any ASGI host
    (uvicorn here, Ray Serve later) drains it the same way: `begin_drain`, then wait for `in_flight` to be 0."""

    in_flight: int = 0
    draining: bool = False

    def begin_drain(self) -> None:
        self.draining = True


@dataclass
class AppState:
    models: ModelRegistry
    config: ServerConfig
    metrics: ServerMetrics
    live: LiveSampler  # per-second samples of the metrics, for /metrics/live
    gateway: Gateway = field(default_factory=Gateway)
    guard: Guard | None = None  # the guardrails policy's rails; None: no rails (and /v1/moderations uses defaults)
    started_at: int = field(default_factory=lambda: int(time.time()))


def app_state(connection: HTTPConnection) -> AppState:
    state: AppState = connection.app.state.qanat
    return state

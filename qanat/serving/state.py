"""The serving app's typed state: one object instead of a dict, found on `app.state.qanat`."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from starlette.requests import HTTPConnection

from qanat.config import ServerConfig
from qanat.engine.client import EngineClient
from qanat.serving.metrics import ServerMetrics


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
    engine: EngineClient
    config: ServerConfig
    metrics: ServerMetrics
    gateway: Gateway = field(default_factory=Gateway)
    started_at: int = field(default_factory=lambda: int(time.time()))


def app_state(connection: HTTPConnection) -> AppState:
    state: AppState = connection.app.state.qanat
    return state

"""`qanat serve`: load the engine, then run uvicorn; SIGTERM drains in-flight requests before exiting."""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from types import FrameType

import uvicorn

from qanat.config import EngineConfig, ServerConfig
from qanat.engine.engine import Engine
from qanat.server.app import create_app, startup_line

log = logging.getLogger("qanat.server")


class DrainingServer(uvicorn.Server):
    """On SIGTERM/SIGINT: answer 503 to new work, let in-flight requests finish (up to a grace period), exit 0."""

    def __init__(self, config: uvicorn.Config, gateway: dict[str, int | bool], drain_timeout_s: float) -> None:
        super().__init__(config)
        self.gateway = gateway
        self.drain_timeout_s = drain_timeout_s
        self.drain_deadline: float | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.drain_deadline is not None:  # a second signal: stop now
            super().handle_exit(sig, frame)
            return
        self.gateway["draining"] = True
        self.drain_deadline = time.monotonic() + self.drain_timeout_s

    async def on_tick(self, counter: int) -> bool:
        if self.drain_deadline is not None and (
            self.gateway["in_flight"] == 0 or time.monotonic() > self.drain_deadline
        ):
            self.should_exit = True
        return await super().on_tick(counter)


def serve(engine_config: EngineConfig, server_config: ServerConfig) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    engine = Engine(engine_config)
    try:
        app = create_app(engine, server_config)
        config = uvicorn.Config(app, host=server_config.host, port=server_config.port, log_level="warning",
                                timeout_graceful_shutdown=int(server_config.drain_timeout_s) + 1)
        server = DrainingServer(config, app.state.gateway, server_config.drain_timeout_s)
        print(startup_line(engine, server_config), file=sys.stderr, flush=True)
        asyncio.run(server.serve())
    finally:
        engine.shutdown()
    return 0



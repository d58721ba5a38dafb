"""`qanat serve`: build the system, run uvicorn; SIGTERM drains in-flight requests before exiting.

Signals are ours, not uvicorn's: uvicorn runs in a worker thread (where it installs no handlers), and the main
thread turns SIGTERM/SIGINT into the app's own drain (`Gateway`), so the same app drains the same way under
any ASGI host. A second signal stops at once.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
import time
from types import FrameType

import uvicorn

from qanat.build import build_app, build_llamacpp_engine, build_models
from qanat.config import EngineConfig, ServerConfig
from qanat.guard.policy import load_policy_file
from qanat.router.config import load_config_file
from qanat.serving.app import startup_line
from qanat.serving.state import AppState, ModelRegistry

log = logging.getLogger("qanat.server")


def serve(engine_config: EngineConfig, server_config: ServerConfig, config_file: str | None = None,
          guardrails_file: str | None = None) -> int:
    """Serve the embedded model (or --model) alone, or every model a qanat.yaml lists; with guardrails from
    --guardrails, else from the qanat.yaml's `guardrails:` section."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    loaded = load_config_file(config_file) if config_file else None
    # Read before any engine starts, so a bad policy file fails fast.
    guardrails = load_policy_file(guardrails_file) if guardrails_file else loaded.guardrails if loaded else None
    models = (build_models(loaded, engine_config) if loaded is not None
              else ModelRegistry.of(build_llamacpp_engine(engine_config)))
    try:
        app = build_app(models, server_config, guardrails)
        state: AppState = app.state.qanat
        server = uvicorn.Server(uvicorn.Config(
            app, host=server_config.host, port=server_config.port, log_level="warning",
            # Per-request work that nothing here uses: access lines (below "warning", never shown) and the
            # client address from X-Forwarded-For.
            access_log=False, proxy_headers=False,
            timeout_graceful_shutdown=int(server_config.drain_timeout_s) + 1,
        ))
        signals: list[int] = []

        def on_signal(sig: int, frame: FrameType | None) -> None:
            signals.append(sig)

        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, on_signal)
        thread = threading.Thread(target=server.run, name="uvicorn")
        thread.start()
        while not server.started and thread.is_alive():
            time.sleep(0.05)
        if not server.started:  # uvicorn said why (the port is taken, ...)
            thread.join()
            return 1
        print(startup_line(models, server_config), file=sys.stderr, flush=True)
        while thread.is_alive() and not signals:
            time.sleep(0.1)
        if signals:
            _drain(state, server_config.drain_timeout_s, signals)
        server.should_exit = True
        thread.join()
    finally:
        models.shutdown()
    return 0


def _drain(state: AppState, timeout_s: float, signals: list[int]) -> None:
    """503 to new work; in-flight requests get up to `timeout_s`, or until a second signal."""
    state.gateway.begin_drain()
    log.info("draining %d in-flight requests (up to %.0f s)", state.gateway.in_flight, timeout_s)
    deadline = time.monotonic() + timeout_s
    while state.gateway.in_flight > 0 and time.monotonic() < deadline and len(signals) == 1:
        time.sleep(0.05)


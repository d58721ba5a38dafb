"""Any executor in a child process, behind a pipe: a crash down there (a llama.cpp abort, a bad GGUF, the OOM
killer) becomes `ExecutorDiedError` up here instead of a dead server, and `restart` brings a new one up.

Per step, one message each way: the batch (token ids, positions, cache ops, new samplers' params) down, the
sampled ids, log-probabilities and meter readings back, pickled over a pipe. Spawned, not forked: the parent
has threads (the event loop, uvicorn) that a fork would copy mid-stride.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import signal
import time
from dataclasses import replace
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

from qanat.engine.executors.base import (
    ExecutorDiedError,
    ExecutorFacts,
    ExecutorSpec,
    ExecutorStartError,
    StepBatch,
    StepResult,
)

log = logging.getLogger("qanat.executor")

START_TIMEOUT_S = 300.0  # loading a large model from a slow disk


def _child_main(conn: Connection, spec: ExecutorSpec) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it closes the pipe
    try:
        executor = spec.create()
    except Exception as e:
        conn.send(("failed", f"{type(e).__name__}: {e}"))
        return
    conn.send(("ready", executor.facts))
    try:
        while True:
            try:
                batch = conn.recv()
            except EOFError:  # the parent is gone
                break
            if batch is None:
                break
            try:
                conn.send(("ok", executor.execute(batch)))
            except Exception as e:  # a failed step fails its requests, not the executor
                conn.send(("error", f"{type(e).__name__}: {e}"))
    finally:
        executor.close()


class ProcessExecutor:
    """The `Executor` protocol, run by a child process. Engine thread only."""

    def __init__(self, spec: ExecutorSpec) -> None:
        self.spec = spec
        self.restarts = 0
        self.boundary_s = 0.0  # round-trip time not spent inside the child's execute: pickling, pipe, wake-ups
        self._ctx = mp.get_context("spawn")
        self._process: BaseProcess | None = None
        self._conn: Connection | None = None
        self.facts: ExecutorFacts = self._start()

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def is_alive(self) -> bool:
        return self._process is not None and self._process.is_alive()

    def _start(self) -> ExecutorFacts:
        parent, child = self._ctx.Pipe()
        process = self._ctx.Process(target=_child_main, args=(child, self.spec), name="qanat-executor", daemon=True)
        process.start()
        child.close()  # so that the child's death reads as EOF here
        self._process, self._conn = process, parent
        if not parent.poll(START_TIMEOUT_S):
            self._kill()
            raise ExecutorStartError(f"the executor did not start within {START_TIMEOUT_S:.0f} s")
        try:
            kind, payload = parent.recv()
        except (EOFError, OSError):
            code = self._kill()
            raise ExecutorStartError(f"the executor process died while starting (exit code {code})") from None
        if kind != "ready":
            self._kill()
            raise ExecutorStartError(str(payload))
        log.info("executor process %s ready", process.pid)
        return payload  # type: ignore[no-any-return]

    def execute(self, batch: StepBatch) -> StepResult:
        assert self._conn is not None
        start_s = time.perf_counter()
        try:
            self._conn.send(batch)
            kind, payload = self._conn.recv()
        except (EOFError, OSError) as e:  # BrokenPipeError, ConnectionResetError: the child is gone
            code = self._kill()
            raise ExecutorDiedError(f"the executor process died (exit code {code})") from e
        if kind == "error":
            raise RuntimeError(payload)
        result: StepResult = payload
        self.boundary_s += max(0.0, time.perf_counter() - start_s - result.compute_s)
        return result

    def restart(self) -> None:
        """Replace a dead (or live) child with a new one; raises ExecutorStartError if it cannot start."""
        self._kill()
        self.restarts += 1
        facts = self._start()
        # Costs are timed afresh at each start: only a change in what was allocated is news.
        if replace(facts, draft_cost=self.facts.draft_cost, pass_cost_s=self.facts.pass_cost_s) != self.facts:
            log.warning("the restarted executor reports %s, was %s", facts, self.facts)

    def close(self) -> None:
        if self._conn is not None and self.is_alive():
            with contextlib.suppress(OSError):
                self._conn.send(None)
            assert self._process is not None
            self._process.join(timeout=10)
        self._kill()

    def _kill(self) -> Any:
        """Make sure the child is gone; returns its exit code."""
        process, self._process = self._process, None
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if process is None:
            return None
        if process.is_alive():
            process.kill()
        process.join(timeout=10)
        return process.exitcode

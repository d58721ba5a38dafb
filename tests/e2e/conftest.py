from __future__ import annotations

from collections.abc import Iterator

import openai
import pytest

from tests.e2e.server import ServerProcess


@pytest.fixture(scope="session")
def server() -> Iterator[ServerProcess]:
    srv = ServerProcess("--ctx", "1024", "--parallel", "8")
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0, timeout=120)


MODEL = "SmolLM2-135M-Instruct"

"""`qanat serve --deterministic`: the same request gives the same numbers, whatever else the server runs."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import openai

from tests.e2e.conftest import MODEL
from tests.e2e.server import ServerProcess

# ≈210 tokens: without --deterministic the second run is a prefix-cache hit (its last token computed alone,
# first log-probability 0.025 off measured), and past 256 cells flash attention decodes a lone sequence with
# another loop than a batched one.
PROMPT = "The water master keeps the count of every share. " * 21


def test_deterministic_server_answers_alone_again_and_under_load_identically() -> None:
    srv = ServerProcess("--ctx", "1024", "--parallel", "8", "--deterministic")
    try:
        client = openai.OpenAI(base_url=f"{srv.base_url}/v1", api_key="unused", max_retries=0, timeout=120)

        def ask() -> tuple[str, list[float]]:
            r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=32, temperature=0, logprobs=1)
            return r.choices[0].text, r.choices[0].logprobs.token_logprobs  # type: ignore[union-attr]

        alone = ask()
        again = ask()
        with ThreadPoolExecutor(8) as pool:
            others = [pool.submit(client.chat.completions.create, model=MODEL, max_tokens=64, temperature=0,
                                  messages=[{"role": "user", "content": f"Tell me about the number {i}."}])
                      for i in range(6)]
            time.sleep(0.5)  # join while the others decode
            crowded = ask()
            assert all(f.result().choices[0].message.content for f in others)
        assert alone == again == crowded
    finally:
        srv.stop()

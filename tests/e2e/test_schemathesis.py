"""Property-based fuzzing of the OpenAPI document: whatever schemathesis sends, the server never answers 5xx."""

from __future__ import annotations

import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode

from tests.e2e.conftest import MODEL
from tests.e2e.server import ServerProcess


def test_schemathesis_finds_no_server_errors() -> None:
    srv = ServerProcess("--ctx", "128", "--parallel", "4")  # a small context keeps random max_tokens quick
    try:
        schema = schemathesis.openapi.from_url(f"{srv.base_url}/openapi.json")
        operations = [result.ok() for result in schema.get_all_operations()]
        assert {op.path for op in operations} >= {"/v1/chat/completions", "/v1/completions", "/v1/models"}
        statuses: list[int] = []
        strategies = [  # negative cases (invalid bodies) only where there is a body to break
            op.as_strategy(generation_mode=mode)
            for op in operations
            for mode in (GenerationMode if op.method.upper() == "POST" else [GenerationMode.POSITIVE])
        ]
        for strategy in strategies:

            @given(case=strategy)
            @settings(max_examples=20, deadline=None, database=None, suppress_health_check=list(HealthCheck))
            def no_server_error(case) -> None:  # type: ignore[no-untyped-def]
                if isinstance(case.body, dict) and "model" in case.body:
                    case.body["model"] = MODEL  # reach past the model check (404s are tested elsewhere)
                if srv.proc.poll() is not None:
                    return  # reported below, with the server's output
                response = case.call(timeout=180)
                statuses.append(response.status_code)
                assert response.status_code < 500, (case.method, case.path, case.body, response.text[:500])

            no_server_error()
        assert 400 in statuses and 200 in statuses  # it reached both the validation and the happy paths
    finally:
        died = srv.proc.poll() is not None
        output = srv.stop()
        assert not died, f"the server died:\n{output[-4000:]}"

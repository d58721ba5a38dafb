"""Nothing above the executor imports llama.cpp: the seam that lets engines and chips be switched."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

QANAT = Path(__file__).parent.parent / "qanat"
ALLOWED = {QANAT / "engine" / "executors" / "llamacpp.py", QANAT / "engine" / "executors" / "draft_model.py"}


def test_serving_app_on_the_fake_engine_never_loads_llama_cpp() -> None:
    code = (
        "import sys, httpx, asyncio\n"
        "from qanat.build import build_app, build_fake_engine\n"
        "from qanat.config import EngineConfig, ServerConfig\n"
        "import qanat.serving.run, qanat.cli\n"
        "engine = build_fake_engine(EngineConfig(ctx=128, parallel=2, batch_tokens=32))\n"
        "app = build_app(engine, ServerConfig())\n"
        "async def go():\n"
        "    t = httpx.ASGITransport(app=app)\n"
        "    async with httpx.AsyncClient(transport=t, base_url='http://q') as c:\n"
        "        r = await c.post('/v1/chat/completions', json={'model': 'fake-model', 'max_tokens': 3,\n"
        "                         'messages': [{'role': 'user', 'content': 'hi'}]})\n"
        "        assert r.status_code == 200, r.text\n"
        "asyncio.run(go())\n"
        "engine.shutdown()\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'llama_cpp'))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_only_the_llamacpp_executor_imports_llama_cpp() -> None:
    offenders = []
    for path in QANAT.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(n.split(".")[0] == "llama_cpp" for n in names) and path not in ALLOWED:
                offenders.append(str(path.relative_to(QANAT)))
    assert offenders == []

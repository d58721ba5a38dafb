"""qanat.yaml: a good file loads; a bad one gets an error naming the line and the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from qanat.cli import main
from qanat.config import ConfigError
from qanat.router.config import load_config_file

GOOD = """\
models:
  - name: smollm2                 # the name clients send as "model"
    policy: least_load
    fallbacks: [other-model]
    replicas:
      - name: local-a
        gguf: default
        parallel: 8
        threads: 1
      - name: gpu-b
        url: http://127.0.0.1:8101/v1
        model: SmolLM2-135M-Instruct
        api_key_env: GPU_B_KEY
  - name: other-model
    replicas:
      - name: only
        url: https://api.example.invalid/v1
        model: m
guardrails: guardrails.yaml
"""


def write(tmp_path: Path, text: str) -> Path:
    (tmp_path / "guardrails.yaml").write_text("input: {pii: redact}\n")  # GOOD's guardrails file
    path = tmp_path / "qanat.yaml"
    path.write_text(text)
    return path


def test_the_readme_shape_loads(tmp_path: Path) -> None:
    spec = load_config_file(write(tmp_path, GOOD)).spec
    smol = spec.models[0]
    assert smol.policy == "least_load" and smol.fallbacks == ["other-model"]
    local, remote = smol.replicas
    assert local.is_local and local.parallel == 8 and local.threads == 1
    assert not remote.is_local and remote.model == "SmolLM2-135M-Instruct" and remote.api_key_env == "GPU_B_KEY"
    assert spec.guardrails == "guardrails.yaml"
    guardrails = load_config_file(write(tmp_path, GOOD)).guardrails
    assert guardrails is not None and guardrails.action("input", "pii/phone") == "redact"


@pytest.mark.parametrize(
    ("change", "where"),
    [
        (("parallel: 8", "parallel: many"), ":8: models[0].replicas[0].parallel"),
        (("policy: least_load", "policy: fastest"), ":3: models[0].policy"),
        (("        threads: 1\n", "        threads: 1\n        url: http://x/v1\n        model: m\n"),
         ":6: models[0].replicas[0]"),
        (("        model: SmolLM2-135M-Instruct\n", ""), ":10: models[0].replicas[1]"),
        (("fallbacks: [other-model]", "fallbacks: [nowhere]"), ":4: models[0].fallbacks[0]"),
        (("        threads: 1\n", "        threads: 1\n        colour: blue\n"), ":10: models[0].replicas[0].colour"),
        (("url: http://127.0.0.1:8101/v1", "url: ftp://x"), ":11: models[0].replicas[1].url"),
        (("      - name: only", "      - name: 'bad name'"), ":16: models[1].replicas[0].name"),
        (("  - name: smollm2 ", "  - nam: smollm2 "), ":2: models[0]"),
        (("models:\n", "models: [\n"), ":2: not valid YAML"),
    ],
)
def test_a_bad_file_names_the_line_and_the_field(tmp_path: Path, change: tuple[str, str], where: str) -> None:
    old, new = change
    assert old in GOOD
    path = write(tmp_path, GOOD.replace(old, new, 1))
    with pytest.raises(ConfigError) as info:
        load_config_file(path)
    assert str(info.value).startswith(f"{path}{where}"), str(info.value)


def test_duplicate_names_and_empty_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="replica names must be unique"):
        load_config_file(write(tmp_path, GOOD.replace("name: gpu-b", "name: local-a")))
    with pytest.raises(ConfigError, match=":1: the file is empty"):
        load_config_file(write(tmp_path, ""))
    with pytest.raises(ConfigError, match="cannot read it"):
        load_config_file(tmp_path / "missing.yaml")


def test_secrets_come_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    remote = load_config_file(write(tmp_path, GOOD)).spec.models[0].replicas[1]
    monkeypatch.delenv("GPU_B_KEY", raising=False)
    with pytest.raises(ConfigError, match="GPU_B_KEY is not set"):
        remote.api_key()
    monkeypatch.setenv("GPU_B_KEY", "sk-test")
    assert remote.api_key() == "sk-test"


def test_config_check_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "check", str(write(tmp_path, GOOD))]) == 0
    out = capsys.readouterr().out
    assert "smollm2: least_load over local-a (local default), gpu-b (http://127.0.0.1:8101/v1)" in out
    assert main(["config", "check", str(write(tmp_path, GOOD.replace("parallel: 8", "parallel: 0")))]) == 2
    assert ":8: models[0].replicas[0].parallel" in capsys.readouterr().err


def test_the_example_in_the_repository_is_valid(capsys: pytest.CaptureFixture[str]) -> None:
    example = Path(__file__).parent.parent.parent / "examples" / "qanat.yaml"
    assert main(["config", "check", str(example)]) == 0
    assert "smollm2: least_load over local-a (local default), local-b (local default)" in capsys.readouterr().out

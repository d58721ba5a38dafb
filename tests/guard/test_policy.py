"""The policy file: defaults, fallbacks, and errors that name the line and the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from qanat.config import ConfigError
from qanat.guard.policy import GuardrailsPolicy, load_policy_file
from qanat.router.config import load_config_file

GOOD = """\
guardrails:
  input:
    prompt_injection: block
    pii/phone: redact
    language: block
  output:
    pii: redact
    pii/ip: log
  languages: [ar, ary, zgh, fr, en]
  blocked_topics:
    weapons: [explosive, "قنبلة"]
"""


def write(tmp_path: Path, text: str, name: str = "guardrails.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_actions_fall_back_to_the_parent_then_to_defaults_then_off(tmp_path: Path) -> None:
    policy = load_policy_file(write(tmp_path, GOOD))
    assert policy.action("input", "pii/phone") == "redact"
    assert policy.action("input", "pii/email") == "log"  # the default for "pii"
    assert policy.action("input", "pii/secret") == "redact"  # a default kept under the file's actions
    assert policy.action("output", "pii/card") == "redact" and policy.action("output", "pii/ip") == "log"
    assert policy.action("output", "prompt_injection") == "off"
    assert policy.scan_settings().languages == ("ar", "ary", "zgh", "fr", "en")
    # The policy at the top level of a file works too.
    assert load_policy_file(write(tmp_path, "output: {pii: block}\n")).action("output", "pii/iban") == "block"
    assert GuardrailsPolicy().active_categories("output") >= {"pii/phone", "blocked_topic"}


@pytest.mark.parametrize(
    ("change", "where"),
    [
        (("pii/phone: redact", "pii/fone: redact"), ":2: guardrails.input: unknown category 'pii/fone'"),
        (("pii/phone: redact", "pii/phone: hide"), ":4: guardrails.input.pii/phone: Input should be 'block'"),
        (("language: block", "language: redact"), ":2: guardrails.input: language can be block, log or off"),
        (("languages: [ar, ary, zgh, fr, en]", "languages: [arabic]"), ":9: guardrails.languages[0]: String should"),
        (("languages: [ar, ary, zgh, fr, en]", "languages: []"), ":1: guardrails: input.language needs 'languages'"),
        (("weapons: [explosive", "weapons: [''"), ":11: guardrails.blocked_topics.weapons[0]: String should"),
        (("  output:", "  outptu:"), ":6: guardrails.outptu: Extra inputs are not permitted"),
        (("prompt_injection: block", "prompt_injection: [block"), ":4: not valid YAML"),
    ],
)
def test_bad_policy_files_name_the_line_and_field(tmp_path: Path, change: tuple[str, str], where: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_policy_file(write(tmp_path, GOOD.replace(*change)))
    assert where in str(e.value), str(e.value)


def test_missing_and_odd_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read it"):
        load_policy_file(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="guardrails: must be a mapping"):
        load_policy_file(write(tmp_path, "- block\n"))
    assert load_policy_file(write(tmp_path, "")) == GuardrailsPolicy()


QANAT = """\
models:
  - name: m
    replicas:
      - name: a
        url: http://127.0.0.1:9/v1
        model: m
guardrails:
  input: {pii: redact}
  output:
    pii: shout
"""


def test_the_qanat_yaml_section_inline_or_as_a_path(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        load_config_file(write(tmp_path, QANAT, "qanat.yaml"))
    assert "qanat.yaml:10: guardrails.output.pii: Input should be" in str(e.value)
    loaded = load_config_file(write(tmp_path, QANAT.replace("shout", "block"), "qanat.yaml"))
    assert loaded.guardrails is not None and loaded.guardrails.action("output", "pii/card") == "block"
    write(tmp_path, "input: {pii: block}\n", "rails.yaml")
    text = QANAT.split("guardrails:")[0] + "guardrails: rails.yaml\n"
    loaded = load_config_file(write(tmp_path, text, "qanat.yaml"))
    assert loaded.guardrails is not None and loaded.guardrails.action("input", "pii/phone") == "block"


def test_serve_refuses_a_bad_policy_before_any_engine_starts(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    from qanat import cli

    bad = write(tmp_path, "input:\n  pii: maybe\n")
    assert cli.main(["serve", "--guardrails", str(bad)]) == 2
    assert f"{bad}:2: guardrails.input.pii: Input should be" in capsys.readouterr().err


def test_config_check_shows_the_guardrails(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from qanat import cli

    path = write(tmp_path, QANAT.replace("shout", "block"), "qanat.yaml")
    assert cli.main(["config", "check", str(path)]) == 0
    out = capsys.readouterr().out
    assert "guardrails: input {" in out and "'pii': 'block'" in out

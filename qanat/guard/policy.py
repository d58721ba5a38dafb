"""The guardrails policy: per direction (input, output) and category an action, the language allow-list,
blocked topics. Validated once by pydantic; a bad file gets an error naming the line and the field
(`guardrails.yaml:4: guardrails.input.pii/fone: unknown category ...`).

    guardrails:
      input:  {prompt_injection: block, pii: log, pii/secret: redact, blocked_topic: block, language: block}
      output: {pii: redact, blocked_topic: block}
      languages: [ar, ary, zgh, fr, en]
      blocked_topics: {weapons: [explosive, "قنبلة"]}

A category's action falls back to its parent's ("pii/phone" -> "pii"), then to "off".
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from qanat.config import ConfigError
from qanat.guard.scan import ScanSettings
from qanat.guard.spans import CATEGORIES, parent_category
from qanat.yamlfile import Lines, field_name, line_of, read_yaml

Action = Literal["block", "redact", "log", "off"]
Direction = Literal["input", "output"]
DIRECTIONS: tuple[Direction, ...] = ("input", "output")

# A file's actions are laid over these (write `off` to turn one off).
DEFAULT_INPUT: dict[str, Action] = {"prompt_injection": "block", "blocked_topic": "block", "pii/secret": "redact",
                                    "pii": "log"}
DEFAULT_OUTPUT: dict[str, Action] = {"pii": "redact", "blocked_topic": "block"}


def _check_actions(actions: dict[str, Action]) -> dict[str, Action]:
    for category, action in actions.items():
        if category not in CATEGORIES:
            raise ValueError(f"unknown category {category!r}; the categories are {', '.join(CATEGORIES)}")
        if category == "language" and action == "redact":
            raise ValueError("language can be block, log or off (a whole text's language cannot be redacted)")
    return actions


class GuardrailsPolicy(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    input: dict[str, Action] = Field(default_factory=lambda: dict(DEFAULT_INPUT))
    output: dict[str, Action] = Field(default_factory=lambda: dict(DEFAULT_OUTPUT))
    languages: list[Annotated[str, Field(pattern=r"^[a-z]{2,3}$")]] = Field(default_factory=list)
    blocked_topics: dict[str, list[Annotated[str, Field(min_length=1)]]] = Field(default_factory=dict)
    phone_regions: list[Annotated[str, Field(pattern=r"^[A-Z]{2}$")]] = Field(default_factory=lambda: ["MA", "FR"])
    injection_threshold: Annotated[float, Field(gt=0, le=1)] = 0.5

    @field_validator("input")
    @classmethod
    def _input_over_defaults(cls, actions: dict[str, Action]) -> dict[str, Action]:
        return {**DEFAULT_INPUT, **_check_actions(actions)}

    @field_validator("output")
    @classmethod
    def _output_over_defaults(cls, actions: dict[str, Action]) -> dict[str, Action]:
        return {**DEFAULT_OUTPUT, **_check_actions(actions)}

    @model_validator(mode="after")
    def _language_needs_a_list(self) -> GuardrailsPolicy:
        for direction in DIRECTIONS:
            if getattr(self, direction).get("language", "off") != "off" and not self.languages:
                raise ValueError(f"{direction}.language needs 'languages', the allow-list (e.g. [ar, ary, fr, en])")
        return self

    def action(self, direction: Direction, category: str) -> Action:
        actions = self.input if direction == "input" else self.output
        if category in actions:
            return actions[category]
        parent = parent_category(category)
        return actions.get(parent, "off") if parent is not None else "off"

    def active_categories(self, direction: Direction) -> set[str]:
        """The categories whose detectors must run for `direction` (an action other than off)."""
        return {c for c in CATEGORIES if c != "pii" and self.action(direction, c) != "off"}

    def scan_settings(self) -> ScanSettings:
        return ScanSettings(phone_regions=tuple(self.phone_regions), injection_threshold=self.injection_threshold,
                            languages=tuple(self.languages),
                            topics={k: tuple(v) for k, v in self.blocked_topics.items()})


def parse_policy(data: Any, source: str, lines: Lines | None = None,
                 prefix: tuple[str | int, ...] = ()) -> GuardrailsPolicy:
    """Validate `data`; errors say `SOURCE:LINE: guardrails.FIELD: what is wrong`. `prefix` is where `data`
    sits in the file whose `lines` (path -> line) are given."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}:{(lines or {}).get(prefix, 1)}: guardrails: must be a mapping")
    try:
        return GuardrailsPolicy.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        loc = (*prefix, *first["loc"])
        line = line_of(loc, lines or {})
        where = field_name(("guardrails", *first["loc"]))
        message = str(first["msg"]).removeprefix("Value error, ")
        raise ConfigError(f"{source}:{line}: {where}: {message}") from e


def load_policy_file(path: str | Path) -> GuardrailsPolicy:
    """A guardrails file: the policy at its top level, or under a `guardrails:` key."""
    path = Path(path)
    data, lines = read_yaml(path)
    data = data if data is not None else {}
    if isinstance(data, dict) and set(data) == {"guardrails"}:
        return parse_policy(data["guardrails"], str(path), lines, ("guardrails",))
    return parse_policy(data, str(path), lines)

"""`qanat.yaml`: the models a server offers and the replicas behind each, validated once.

A bad file gets an error that names the line and the field (`qanat.yaml:7: models[0].replicas[1].parallel:
...`). Secrets never sit in the file: a remote replica names the environment variable that holds its key.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from qanat.config import FLASH_ATTN_MODES, ConfigError, EngineConfig
from qanat.yamlfile import Lines, field_name, line_of, read_yaml

if TYPE_CHECKING:
    from qanat.guard.policy import GuardrailsPolicy

Policy = Literal["round_robin", "least_load", "prefix", "session", "energy"]
POLICIES: tuple[str, ...] = ("round_robin", "least_load", "prefix", "session", "energy")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ReplicaSpec(_Strict):
    """A local engine (`gguf`) or a remote OpenAI-compatible upstream (`url`): exactly one of the two."""

    name: Annotated[str, Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")]
    # local: a GGUF path, or "default" for the embedded model; its engine settings as `qanat serve` takes them
    gguf: str | None = None
    parallel: Annotated[int, Field(ge=1, le=256)] = 16
    ctx: Annotated[int, Field(ge=32, le=1_048_576)] = 2048
    threads: Annotated[int, Field(ge=1, le=1024)] | None = None
    batch: Annotated[int, Field(ge=1, le=65536)] = 512
    max_waiting: Annotated[int, Field(ge=0, le=100_000)] = 256
    flash_attn: str = "auto"
    deterministic: bool = False
    # remote: where, the model's name there, the environment variable holding its key, timeouts
    url: Annotated[str, Field(pattern=r"^https?://")] | None = None
    model: str | None = None
    api_key_env: str | None = None
    connect_timeout_s: Annotated[float, Field(gt=0)] = 5.0
    read_timeout_s: Annotated[float, Field(gt=0)] = 120.0  # longest wait between two bytes of a stream
    health_path: str | None = "/health"  # probed relative to the server root; null turns probing off

    @model_validator(mode="after")
    def _one_kind(self) -> ReplicaSpec:
        if (self.gguf is None) == (self.url is None):
            raise ValueError("a replica needs exactly one of 'gguf' (a local engine) or 'url' (a remote server)")
        if self.flash_attn not in FLASH_ATTN_MODES:
            raise ValueError(f"flash_attn must be one of {', '.join(FLASH_ATTN_MODES)}")
        if self.url is not None and self.model is None:
            raise ValueError("a remote replica needs 'model': the model's name on that server")
        return self

    @property
    def is_local(self) -> bool:
        return self.gguf is not None

    def engine_config(self, defaults: EngineConfig) -> EngineConfig:
        """The local engine's settings; anything the file leaves out comes from `defaults` (the command line)."""
        assert self.gguf is not None
        return EngineConfig(
            model=None if self.gguf == "default" else self.gguf, ctx=self.ctx, parallel=self.parallel,
            threads=self.threads or defaults.threads, batch_tokens=self.batch, max_waiting=self.max_waiting,
            flash_attn=self.flash_attn, deterministic=self.deterministic, energy_meter=defaults.energy_meter,
            cpu_tdp_w=defaults.cpu_tdp_w,
        )

    def api_key(self) -> str | None:
        if self.api_key_env is None:
            return None
        key = os.environ.get(self.api_key_env)
        if not key:
            raise ConfigError(f"replica {self.name}: the environment variable {self.api_key_env} is not set")
        return key


class ModelSpec(_Strict):
    name: Annotated[str, Field(min_length=1)]  # what clients send as "model"
    policy: Policy = "least_load"
    fallbacks: list[str] = Field(default_factory=list)
    max_retries: Annotated[int, Field(ge=0, le=10)] = 2  # other replicas tried before the first token
    replicas: Annotated[list[ReplicaSpec], Field(min_length=1)]

    @model_validator(mode="after")
    def _unique(self) -> ModelSpec:
        names = [r.name for r in self.replicas]
        if len(set(names)) != len(names):
            raise ValueError(f"replica names must be unique within a model, got {names}")
        return self


class QanatFile(_Strict):
    models: Annotated[list[ModelSpec], Field(min_length=1)]
    # qanat/guard/policy.py: a policy file's path (relative to this file) or the policy itself, inline
    guardrails: str | dict[str, Any] | None = None

    def reference_errors(self) -> list[tuple[tuple[str | int, ...], str]]:
        """Names that must match across models, as (where, what is wrong)."""
        errors: list[tuple[tuple[str | int, ...], str]] = []
        names = [m.name for m in self.models]
        for i, model in enumerate(self.models):
            if names.index(model.name) != i:
                errors.append((("models", i, "name"), f"model name {model.name!r} is used twice"))
            for j, fallback in enumerate(model.fallbacks):
                if fallback not in names or fallback == model.name:
                    errors.append((("models", i, "fallbacks", j),
                                   f"fallback {fallback!r} is not another model of this file"))
        return errors


@dataclass(frozen=True)
class LoadedFile:
    spec: QanatFile
    path: Path
    guardrails: GuardrailsPolicy | None = None


def load_config_file(path: str | Path) -> LoadedFile:
    """Parse and validate; every error says `FILE:LINE: field: what is wrong`."""
    path = Path(path)
    data, lines = read_yaml(path)
    if data is None:
        raise ConfigError(f"{path}:1: the file is empty; it needs a 'models' list")
    try:
        spec = QanatFile.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        loc = tuple(first["loc"])
        raise ConfigError(f"{path}:{line_of(loc, lines)}: {field_name(loc) or 'file'}: {first['msg']}") from e
    for loc, message in spec.reference_errors():
        raise ConfigError(f"{path}:{line_of(loc, lines)}: {field_name(loc)}: {message}")
    return LoadedFile(spec, path, _guardrails(spec.guardrails, path, lines))


def _guardrails(section: str | dict[str, Any] | None, path: Path, lines: Lines) -> GuardrailsPolicy | None:
    from qanat.guard.policy import load_policy_file, parse_policy

    if section is None:
        return None
    if isinstance(section, str):
        return load_policy_file(path.parent / section)
    return parse_policy(section, str(path), lines, ("guardrails",))

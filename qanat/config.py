"""Start-up configuration: frozen, sectioned, validated once, with errors that name the offending value."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from qanat.energy.carbon import CarbonModel
from qanat.energy.meters import METER_KINDS
from qanat.engine.core.speculation import SPECULATIVE_MODES

FLASH_ATTN_MODES = ("auto", "on", "off")  # llama.cpp's flash attention


def default_cache_ram_mib() -> int:
    """The prompt cache's RAM tier by default: llama-server's 8 GiB, or an eighth of this machine's memory."""
    try:
        total_mib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20
    except (ValueError, OSError, AttributeError):
        return 1024
    return int(min(8192, total_mib // 8))


class ConfigError(ValueError):
    pass


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


@dataclass(frozen=True)
class EngineConfig:
    model: str | None = None  # a GGUF path; None = the embedded default model
    ctx: int = 2048  # context per request (prompt + output), as Ollama's num_ctx: KV = ctx x parallel
    parallel: int = 16  # sequences decoded together
    threads: int = os.cpu_count() or 1
    batch_tokens: int = 512  # the most tokens one forward pass takes (llama.cpp n_batch)
    max_waiting: int = 256  # requests queued beyond the parallel slots before 429
    flash_attn: str = "auto"  # auto | on | off: llama.cpp's flash attention
    deterministic: bool = False  # results independent of other traffic: flash attention off, no prefix cache
    energy_meter: str = "auto"  # auto | nvml | rapl | estimate
    cpu_tdp_w: float | None = None  # for the CPU-time estimate; None = from the built-in table
    cache_ram_mib: int = field(default_factory=default_cache_ram_mib)  # prompt cache beyond the slots; 0 = none
    cache_dir: str | None = None  # the prompt cache's disk tier (survives restarts); None = none
    cache_disk_mib: int = 16384  # the most the disk tier holds
    speculative: str = "off"  # off | ngram | draft: guess tokens (prompt lookup, a draft model), verify in the step
    draft_max: int = 16  # most drafted tokens per request and step
    draft_min: int = 0  # fewest drafted tokens per speculating request and step, whatever the cost rule says
    ngram_min: int = 2  # shortest n-gram prompt lookup matches
    draft_model: str | None = None  # --speculative draft: a GGUF sharing the model's vocabulary, or "default"

    def __post_init__(self) -> None:
        _require(32 <= self.ctx <= 1_048_576, f"--ctx must be between 32 and 1048576, got {self.ctx}")
        _require(1 <= self.parallel <= 256, f"--parallel must be between 1 and 256, got {self.parallel}")
        _require(1 <= self.threads <= 1024, f"--threads must be between 1 and 1024, got {self.threads}")
        _require(
            self.parallel <= self.batch_tokens <= 65536,
            f"--batch must be between --parallel ({self.parallel}) and 65536, got {self.batch_tokens}",
        )
        _require(0 <= self.max_waiting <= 100_000, f"--max-waiting must be in 0..100000, got {self.max_waiting}")
        _require(self.flash_attn in FLASH_ATTN_MODES,
                 f"--flash-attn must be one of {', '.join(FLASH_ATTN_MODES)}, got {self.flash_attn!r}")
        _require(not (self.deterministic and self.flash_attn == "on"),
                 "--deterministic needs flash attention off: its CPU kernel's numbers depend on the batch")
        _require(self.energy_meter in METER_KINDS,
                 f"--energy-meter must be one of {', '.join(METER_KINDS)}, got {self.energy_meter!r}")
        _require(self.speculative in SPECULATIVE_MODES,
                 f"--speculative must be one of {', '.join(SPECULATIVE_MODES)}, got {self.speculative!r}")
        _require(1 <= self.draft_max <= 64, f"--draft-max must be between 1 and 64, got {self.draft_max}")
        _require(0 <= self.draft_min <= self.draft_max,
                 f"--draft-min must be between 0 and --draft-max ({self.draft_max}), got {self.draft_min}")
        _require(self.speculative != "draft" or self.draft_model is not None,
                 "--speculative draft needs --draft-model PATH (a GGUF sharing the model's vocabulary, or 'default' "
                 "for the embedded model)")
        _require(self.draft_model is None or self.speculative == "draft",
                 f"--draft-model {self.draft_model} is only used with --speculative draft "
                 f"(got --speculative {self.speculative})")
        _require(self.draft_model is None or bool(self.draft_model.strip()), "--draft-model must not be empty")
        _require(1 <= self.ngram_min <= 8, f"--ngram-min must be between 1 and 8, got {self.ngram_min}")
        _require(self.cpu_tdp_w is None or 1 <= self.cpu_tdp_w <= 2000,
                 f"--cpu-tdp-w must be between 1 and 2000 W, got {self.cpu_tdp_w}")
        _require(0 <= self.cache_ram_mib <= 16_777_216,
                 f"--cache-ram must be in 0..16777216 MiB, got {self.cache_ram_mib}")
        _require(1 <= self.cache_disk_mib <= 1 << 30, f"--cache-disk must be >= 1 MiB, got {self.cache_disk_mib}")
        _require(self.cache_dir is None or bool(self.cache_dir.strip()), "--cache-dir must not be empty")

    @property
    def cache_tiers(self) -> tuple[str, ...]:
        """The prompt cache's tiers beyond the slots."""
        return (("ram",) if self.cache_ram_mib else ()) + (("disk",) if self.cache_dir else ())


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    api_keys: tuple[str, ...] = ()  # empty = no authentication
    max_body_bytes: int = 4 * 1024 * 1024
    drain_timeout_s: float = 30.0  # SIGTERM: how long in-flight requests may take to finish
    carbon: CarbonModel = field(default_factory=CarbonModel)
    webui: bool = True  # the chat playground and live dashboard at /

    def __post_init__(self) -> None:
        _require(0 <= self.port <= 65535, f"--port must be in 0..65535, got {self.port}")
        _require(all(self.api_keys), "API keys must not be empty strings")
        _require(self.max_body_bytes >= 1024, f"max body size must be >= 1024 bytes, got {self.max_body_bytes}")
        _require(self.drain_timeout_s >= 0, f"drain timeout must be >= 0, got {self.drain_timeout_s}")


@dataclass(frozen=True)
class RuntimeInfo:
    """What start-up learnt, apart from the config that asked for it."""

    model_id: str  # the name clients send as "model"
    model_path: str
    context_length: int  # tokens per request (prompt plus output) that the KV cache actually holds
    num_slots: int
    batch_tokens: int  # the most tokens one step carries
    n_vocab: int
    eog_ids: frozenset[int]
    chip: str
    energy_source: str

"""The one place that turns frozen config into a running system:
model registry -> executor -> engine core -> LocalEngine (an EngineClient) -> serving app.

Constructors below this line only store what they are given, so a test builds the same system on the fake
executor in milliseconds.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from fastapi import FastAPI

from qanat.config import ConfigError, EngineConfig, RuntimeInfo, ServerConfig
from qanat.energy.accounting import EnergyAccountant
from qanat.engine.client import EngineClient
from qanat.engine.core.loop import EngineCore
from qanat.engine.core.prefix_cache import PrefixCache
from qanat.engine.core.scheduler import Scheduler
from qanat.engine.core.speculation import SpeculationConfig, Speculator
from qanat.engine.executors.base import Executor, Tokenizer
from qanat.engine.executors.fake import FakeSpec, FakeTokenizer
from qanat.engine.executors.kv_tiers import TierSettings
from qanat.engine.executors.process import ProcessExecutor
from qanat.engine.local import LocalEngine
from qanat.engine.remote import RemoteEngine, RemoteSettings
from qanat.models.chat_template import ChatTemplate
from qanat.models.locate import ModelNotFoundError, model_id_for, resolve_model_path
from qanat.router.config import LoadedFile
from qanat.router.metrics import RouterMetrics
from qanat.router.policies import ReplicaView, make_policy
from qanat.router.router import ModelRouter, Replica

log = logging.getLogger("qanat.build")

if TYPE_CHECKING:
    from qanat.engine.executors.llamacpp import LlamaTokenizer
    from qanat.guard.policy import GuardrailsPolicy
    from qanat.serving.state import ModelRegistry


def build_llamacpp_engine(config: EngineConfig, in_process: bool = False) -> LocalEngine:
    """The real model: llama.cpp in a child process (`in_process` only for measuring what that costs)."""
    # Imported here: the serving layer and the fake engine never load llama.cpp.
    from qanat.engine.executors.llamacpp import ContextSettings, LlamaCppSpec, LlamaTokenizer, verification_is_exact

    if config.deterministic and config.speculative != "off" and not verification_is_exact():
        raise ConfigError(
            "--speculative with --deterministic needs llama.cpp built without llamafile (CMAKE_ARGS="
            "-DGGML_LLAMAFILE=OFF): with it, a verification pass of several tokens sums attention in another order "
            "than one-token decodes, so outputs would no longer be bit-identical (bench/verify_exactness.py)")
    path = resolve_model_path(config.model)
    draft_path = None
    if config.draft_model is not None:
        from qanat.engine.executors.draft_model import check_vocab_files

        try:
            draft_path = resolve_model_path(None if config.draft_model == "default" else config.draft_model)
        except ModelNotFoundError as e:
            raise ModelNotFoundError(f"--draft-model: {e}") from e
        check_vocab_files(path, draft_path)  # a clear start-up error here, before the executor loads weights
    settings = ContextSettings(
        config.parallel, config.ctx, config.batch_tokens, config.threads,
        # ggml's CPU flash attention picks its loop by shape (tiles for a prompt chunk, a split KV for a lone
        # sequence's decode past 512 cells): a token's numbers would depend on what shares its pass.
        flash_attn="off" if config.deterministic else config.flash_attn,
    )
    spec = LlamaCppSpec(path, settings, config.energy_meter, config.cpu_tdp_w, tier_settings(config), draft_path,
                        measure_step_cost=config.speculative != "off")
    tokenizer = LlamaTokenizer(path)
    try:
        executor: Executor = spec.create() if in_process else ProcessExecutor(spec)
    except BaseException:
        tokenizer.close()
        raise
    return assemble(config, model_id_for(path), path, tokenizer, executor)


def tier_settings(config: EngineConfig) -> TierSettings:
    return TierSettings(config.cache_ram_mib * 2**20, config.cache_dir, config.cache_disk_mib * 2**20)


def load_gguf_tokenizer(path: Path) -> LlamaTokenizer:
    """A GGUF's vocabulary alone (no weights), for callers that only count tokens (`qanat bench`)."""
    from qanat.engine.executors.llamacpp import LlamaTokenizer

    return LlamaTokenizer(path)


def build_fake_engine(config: EngineConfig, spec: FakeSpec | None = None, in_process: bool = True,
                      model_id: str = "fake-model") -> LocalEngine:
    """The deterministic fake model (no weights): in this process, or in a child to test crashes."""
    spec = spec or FakeSpec(num_slots=config.parallel, context_length=config.ctx, batch_tokens=config.batch_tokens,
                            tiers=tier_settings(config))
    executor: Executor = spec.create() if in_process else ProcessExecutor(spec)
    return assemble(config, model_id, Path("fake"), FakeTokenizer(), executor)


def assemble(config: EngineConfig, model_id: str, path: Path, tokenizer: Tokenizer, executor: Executor
             ) -> LocalEngine:
    facts = executor.facts
    runtime = RuntimeInfo(
        model_id=model_id, model_path=str(path), context_length=facts.context_length, num_slots=facts.num_slots,
        batch_tokens=facts.batch_tokens, n_vocab=tokenizer.n_vocab, eog_ids=tokenizer.eog_ids, chip=facts.chip,
        energy_source=facts.energy_source,
    )
    template_parts = tokenizer.chat_template()
    chat_template = ChatTemplate(*template_parts) if template_parts is not None else None
    # Deterministic mode restores whole prompt chunks only: one computed alone from the same start has the same bits.
    prefix_cache = PrefixCache(config.cache_tiers, block_multiple=facts.batch_tokens if config.deterministic else 1)
    speculator = None
    if config.speculative == "draft":
        log.info("draft model: a one-token draft pass takes %.2f of a target pass's time (measured at load)",
                 facts.draft_cost)
    if config.speculative != "off":
        speculator = Speculator(SpeculationConfig(config.speculative, config.draft_max, config.ngram_min,
                                                  draft_cost=facts.draft_cost, draft_min=config.draft_min,
                                                  pass_cost_s=facts.pass_cost_s))
        log.info("speculation: a pass's fixed cost is %.2f times one more token's (timed at load)",
                 speculator.step_cost.fixed_cost_tokens)
    scheduler = Scheduler(facts.num_slots, facts.context_length, facts.batch_tokens, config.deterministic,
                          prefix_cache=prefix_cache, speculator=speculator)
    core = EngineCore(scheduler, executor, tokenizer, EnergyAccountant(facts.energy_source),
                      max_in_flight=facts.num_slots + config.max_waiting)
    return LocalEngine(runtime, tokenizer, chat_template, core)


def build_models(file: LoadedFile, defaults: EngineConfig) -> ModelRegistry:
    """Every model of a qanat.yaml, each a router over its replicas: local engines (llama.cpp in a child process
    each) and remote upstreams. `defaults` (the command line) fills what the file leaves out."""
    from qanat.serving.state import ModelRegistry

    metrics = RouterMetrics()
    routers: dict[str, ModelRouter] = {}
    built: list[EngineClient] = []
    try:
        for model in file.spec.models:
            replicas = []
            for spec in model.replicas:
                engine: EngineClient
                if spec.is_local:
                    local = build_llamacpp_engine(spec.engine_config(defaults))
                    built.append(local)
                    engine, capacity, health_url = local, local.runtime.num_slots, None
                else:
                    assert spec.url is not None and spec.model is not None
                    engine = RemoteEngine(RemoteSettings(spec.url, spec.model, spec.api_key(), spec.connect_timeout_s,
                                                         spec.read_timeout_s))
                    capacity = spec.parallel
                    root = spec.url.rstrip("/").removesuffix("/v1")
                    health_url = root + spec.health_path if spec.health_path else None
                replicas.append(Replica(ReplicaView(spec.name, capacity), engine, health_url))
            routers[model.name] = ModelRouter(model.name, replicas, make_policy(model.policy), metrics,
                                              model.max_retries)
    except BaseException:
        for engine in built:
            engine.shutdown()
        raise
    for model in file.spec.models:
        routers[model.name].fallbacks = [routers[name] for name in model.fallbacks]
    return ModelRegistry(dict(routers))


def build_app(models: ModelRegistry | EngineClient, config: ServerConfig,
              guardrails: GuardrailsPolicy | None = None) -> FastAPI:
    from qanat.serving.app import create_app

    return create_app(models, config, guardrails)


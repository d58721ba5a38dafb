"""The llama.cpp executor: one model, one context, one batch per step, one sample per decoding request.

With `draft_model.py` (the draft model it holds for `--speculative draft`), the only module of Qanat's engine
that imports llama.cpp. Everything goes through llama.cpp's C API (via llama-cpp-python's ctypes bindings), so
the same code runs on CPU, CUDA, Metal or Vulkan builds of the library.
`LlamaCppSpec` is what a child process needs to build the executor (`process.py`); `LlamaTokenizer` loads the
vocabulary alone, for the caller's side of the boundary.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import logging
import mmap
import random
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import llama_cpp
import llama_cpp._logger as llama_logger
import numpy as np
from llama_cpp.llama_grammar import JSON_GBNF, SchemaConverter, json_schema_to_gbnf

from qanat.energy.meters import cpu_model, open_meter
from qanat.engine.errors import InvalidRequestError
from qanat.engine.executors.base import (
    ExecChunk,
    ExecutorFacts,
    ExecutorStartError,
    PassCost,
    Refusal,
    SampledLogprobs,
    StepBatch,
    StepMeter,
    StepResult,
)
from qanat.engine.executors.kv_tiers import KVTiers, TierSettings
from qanat.engine.sampling import ConstraintKind, OutputConstraint, SamplingParams

if TYPE_CHECKING:
    from qanat.engine.executors.draft_model import DraftModel

llama_logger.logger.setLevel(logging.ERROR)  # llama.cpp's load-time chatter, unless it is an error

log = logging.getLogger("qanat.executor")
_backend_ready = False

FLASH_ATTN = {
    "auto": llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO,
    "on": llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED,
    "off": llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED,
}


def _built_with(feature: str) -> bool:
    """Whether llama.cpp's system info lists `feature` as on (e.g. AMX_INT8, LLAMAFILE)."""
    _init_backend()
    return f"{feature} = 1".encode() in llama_cpp.llama_print_system_info()


def _amx_kernels_are_safe() -> bool:
    """Whether ggml's AMX matmul may run: built by GCC 12 from unpatched sources it faults in the first decode (the
    compiler drops the stores into its tile configuration; third_party/llama-cpp-python/amx-tile-config.patch).
    Qanat's Makefile builds llama-cpp-python with that fix and tags its version `+qanat`."""
    return not _built_with("AMX_INT8") or "+qanat" in llama_cpp.__version__


def verification_is_exact() -> bool:
    """Whether a pass of several tokens of one sequence computes, with flash attention off, exactly what one-token
    decodes compute. Not with llamafile's tinyBLAS built in: it takes every matrix product of two or more columns
    (attention's, on the F16 KV cache) where a one-token decode takes ggml's vec_dot, and sums in another order
    (bench/verify_exactness.py: logits 0.3-0.8 apart; exactly equal without it)."""
    return not _built_with("LLAMAFILE")


def flash_attention_mode(requested: str) -> str:
    """`auto` is llama.cpp's own choice (on wherever supported) on an accelerator, and off where llama.cpp runs on
    the CPU alone: there ggml's flash attention measured slower for every shape (a lone decode 1.4×, a 16-sequence
    decode step 1.4–2×, a pass of several tokens of one sequence 2–3× past 300 cells; docs/benchmarks.md)."""
    if requested == "auto" and not llama_cpp.llama_supports_gpu_offload():
        return "off"
    return requested


def _init_backend() -> None:
    global _backend_ready
    if not _backend_ready:
        llama_cpp.llama_backend_init()
        _backend_ready = True


@dataclass(frozen=True)
class ContextSettings:
    num_slots: int  # parallel sequences
    context_length: int  # KV cells (tokens) per sequence: prompt plus output of one request
    batch_tokens: int  # n_batch = n_ubatch: the most tokens one llama_decode may take
    threads: int
    flash_attn: str = "auto"  # auto | on | off


class LlamaModel:
    """Weights, vocabulary and tokenizer. Thread-safe for tokenizing: it reads only the vocabulary."""

    ptr: Any  # llama_model_p, None once closed

    def __init__(self, path: Path, vocab_only: bool = False) -> None:
        _init_backend()
        params = llama_cpp.llama_model_default_params()
        params.n_gpu_layers = -1  # every layer on the accelerator when the build has one; ignored on CPU
        params.vocab_only = vocab_only  # a tokenizer alone (qanat bench) needs no weights
        # The extra buffer types hold weights repacked for ggml's AMX matmul (Sapphire Rapids and later: prompts
        # ≈4× and multi-token passes 2-4× faster here); without them the AVX-512 kernels run.
        params.use_extra_bufts = _amx_kernels_are_safe()
        self.path = path
        self.ptr = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
        if not self.ptr:
            raise ValueError(f"llama.cpp could not load the model file {path}")
        self.vocab = llama_cpp.llama_model_get_vocab(self.ptr)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        self.eog_ids = frozenset(t for t in range(self.n_vocab) if llama_cpp.llama_vocab_is_eog(self.vocab, t))
        self.bos_id = llama_cpp.llama_vocab_bos(self.vocab)
        self.eos_id = llama_cpp.llama_vocab_eos(self.vocab)
        self._pieces: dict[int, bytes] = {}

    def close(self) -> None:
        if self.ptr:
            llama_cpp.llama_model_free(self.ptr)
            self.ptr = None

    def metadata(self, key: str) -> str | None:
        buf = ctypes.create_string_buffer(1 << 16)
        n = llama_cpp.llama_model_meta_val_str(self.ptr, key.encode(), buf, len(buf))
        if n < 0:
            return None
        if n >= len(buf):  # truncated: chat templates can be long
            buf = ctypes.create_string_buffer(n + 1)
            llama_cpp.llama_model_meta_val_str(self.ptr, key.encode(), buf, len(buf))
        return buf.value.decode("utf-8", errors="replace")

    def tokenize(self, text: str, add_special: bool) -> list[int]:
        """Special tokens written in `text` (`<|im_start|>`) are parsed, as llama.cpp's server does."""
        data = text.encode("utf-8")
        capacity = len(data) + 2
        buf = (llama_cpp.llama_token * capacity)()
        n = llama_cpp.llama_tokenize(self.vocab, data, len(data), buf, capacity, add_special, True)
        if n < 0:
            capacity = -n
            buf = (llama_cpp.llama_token * capacity)()
            n = llama_cpp.llama_tokenize(self.vocab, data, len(data), buf, capacity, add_special, True)
        return list(buf[:n])

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes a token stands for; control tokens (EOS, <|im_end|>) render as nothing."""
        piece = self._pieces.get(token_id)
        if piece is None:
            buf = ctypes.create_string_buffer(64)
            n = llama_cpp.llama_token_to_piece(self.vocab, token_id, buf, len(buf), 0, False)
            if n < 0:
                buf = ctypes.create_string_buffer(-n)
                n = llama_cpp.llama_token_to_piece(self.vocab, token_id, buf, len(buf), 0, False)
            piece = buf.raw[:n]
            self._pieces[token_id] = piece
        return piece

    def token_text(self, token_id: int, special: bool = True) -> str:
        """One token as text, special tokens included (for logprobs and display)."""
        buf = ctypes.create_string_buffer(256)
        n = llama_cpp.llama_token_to_piece(self.vocab, token_id, buf, len(buf), 0, special)
        return buf.raw[: max(n, 0)].decode("utf-8", errors="replace")

    def detokenize(self, token_ids: list[int]) -> str:
        return b"".join(self.token_bytes(t) for t in token_ids).decode("utf-8", errors="replace")


class LlamaTokenizer:
    """The vocabulary alone (no weights, no context): tokenizing on the caller's side of the process boundary."""

    def __init__(self, path: Path) -> None:
        self.model = LlamaModel(path, vocab_only=True)
        self.n_vocab = self.model.n_vocab
        self.eog_ids = self.model.eog_ids

    def tokenize(self, text: str, add_special: bool) -> list[int]:
        return self.model.tokenize(text, add_special)

    def token_bytes(self, token_id: int) -> bytes:
        return self.model.token_bytes(token_id)

    def detokenize(self, token_ids: list[int]) -> str:
        return self.model.detokenize(token_ids)

    def chat_template(self) -> tuple[str, str, str] | None:
        source = self.model.metadata("tokenizer.chat_template")
        if source is None:
            return None
        model = self.model
        bos = model.token_text(model.bos_id) if model.bos_id >= 0 else ""
        eos = model.token_text(model.eos_id) if model.eos_id >= 0 else ""
        return source, bos, eos

    def close(self) -> None:
        self.model.close()


def constraint_grammar(constraint: OutputConstraint) -> str:
    """The GBNF grammar (root rule "root") that enforces a constraint."""
    if constraint.kind is ConstraintKind.JSON_OBJECT:
        return JSON_GBNF
    param = constraint.param or "response_format"
    try:
        if constraint.kind is ConstraintKind.GRAMMAR:
            return (constraint.spec or "") + _schema_rules(constraint.schemas)
        return _strict_json_chars(str(json_schema_to_gbnf(constraint.spec or "{}")))
    except Exception as e:  # the converter raises assorted errors on schemas it cannot express
        raise InvalidRequestError(f"unsupported JSON schema: {e}", param=param) from e


def _schema_rules(schemas: tuple[tuple[str, str], ...]) -> str:
    """GBNF rules for named JSON schemas; one converter, so shared primitives ("space", "string") appear once."""
    if not schemas:
        return ""
    # llama-cpp-python's converter has no type hints.
    converter = SchemaConverter(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)  # type: ignore[no-untyped-call]
    for name, schema in schemas:
        converter.visit(converter.resolve_refs(json.loads(schema), name), name)  # type: ignore[no-untyped-call]
    return "\n" + _strict_json_chars(str(converter.format_grammar()))  # type: ignore[no-untyped-call]


# llama-cpp-python's converter lets raw control characters (a newline) into JSON strings, which JSON parsers
# refuse; llama.cpp's own converter and JSON_GBNF exclude them, as here.
_JSON_CHAR_RULE = r'char ::= [^"\\\x7F\x00-\x1F] | "\\" (["\\/bfnrt] | "u" [0-9a-fA-F]{4})'


def _strict_json_chars(gbnf: str) -> str:
    return "\n".join(_JSON_CHAR_RULE if line.startswith("char ::= ") else line for line in gbnf.split("\n"))


class RequestSampler:
    """A llama.cpp sampler chain for one request. Built from vocabulary alone, so any thread may build it."""

    def __init__(self, model: LlamaModel, params: SamplingParams, penalty_window: int) -> None:
        chain_params = llama_cpp.llama_sampler_chain_default_params()
        chain_params.no_perf = True
        self.ptr = llama_cpp.llama_sampler_chain_init(chain_params)
        self.logprobs = params.logprobs
        self.argmax_only = False

        bias = dict(params.logit_bias)
        for token_id in bias:
            if not 0 <= token_id < model.n_vocab:
                self.close()
                raise InvalidRequestError(
                    f"logit_bias token id {token_id} is outside the vocabulary (0..{model.n_vocab - 1})",
                    param="logit_bias",
                )
        if params.ignore_eos:
            bias.update({t: -np.inf for t in model.eog_ids})
        if bias:
            entries = (llama_cpp.llama_logit_bias * len(bias))(
                *(llama_cpp.llama_logit_bias(token=t, bias=b) for t, b in bias.items())
            )
            self._add(llama_cpp.llama_sampler_init_logit_bias(model.n_vocab, len(bias), entries))
        if params.constraint is not None:
            try:
                gbnf = constraint_grammar(params.constraint)
            except InvalidRequestError:
                self.close()
                raise
            grammar = llama_cpp.llama_sampler_init_grammar(model.vocab, gbnf.encode(), b"root")
            if not grammar:
                self.close()
                param = params.constraint.param or (
                    "grammar" if params.constraint.kind is ConstraintKind.GRAMMAR else "response_format")
                raise InvalidRequestError("the grammar does not parse", param=param)
            self._add(grammar)
        if (params.repetition_penalty, params.frequency_penalty, params.presence_penalty) != (1.0, 0.0, 0.0):
            self._add(llama_cpp.llama_sampler_init_penalties(
                model.n_vocab, penalty_window,
                params.repetition_penalty, params.frequency_penalty, params.presence_penalty,
            ))
        if params.is_greedy:
            # Greedy alone keeps no state, so its pick can be read straight off the logits (the first of equal
            # maxima, as llama.cpp's greedy sampler takes it): a numpy argmax, 4-6 times cheaper than running the
            # chain, which copies the whole vocabulary into a candidate array first.
            self.argmax_only = llama_cpp.llama_sampler_chain_n(self.ptr) == 0
            self._add(llama_cpp.llama_sampler_init_greedy())
            return
        if params.top_k > 0:
            self._add(llama_cpp.llama_sampler_init_top_k(params.top_k))
        if params.top_p < 1.0:
            self._add(llama_cpp.llama_sampler_init_top_p(params.top_p, 1))
        if params.min_p > 0.0:
            self._add(llama_cpp.llama_sampler_init_min_p(params.min_p, 1))
        self._add(llama_cpp.llama_sampler_init_temp(params.temperature))
        seed = random.getrandbits(32) if params.seed is None else params.seed % 2**32
        self._add(llama_cpp.llama_sampler_init_dist(seed))

    def _add(self, sampler: llama_cpp.llama_sampler_p) -> None:
        llama_cpp.llama_sampler_chain_add(self.ptr, sampler)

    def close(self) -> None:
        if self.ptr:
            llama_cpp.llama_sampler_free(self.ptr)
            self.ptr = None


def new_context(model: LlamaModel, settings: ContextSettings) -> Any:
    """A llama_context (llama_context_p) with a KV stream of `context_length` cells per slot."""
    params = llama_cpp.llama_context_default_params()
    params.n_ctx = settings.num_slots * settings.context_length
    params.n_batch = settings.batch_tokens
    params.n_ubatch = settings.batch_tokens
    params.n_seq_max = settings.num_slots
    params.n_threads = settings.threads
    params.n_threads_batch = settings.threads
    params.kv_unified = False  # a stream per sequence: measured ~20% faster decode steps at 16 sequences
    params.flash_attn_type = FLASH_ATTN[flash_attention_mode(settings.flash_attn)]
    params.no_perf = True
    ctx = llama_cpp.llama_init_from_model(model.ptr, params)
    if not ctx:
        raise RuntimeError("llama.cpp could not create a context (out of memory?)")
    return ctx


TIMED_REPEATS = 5  # timed passes of each size when measuring costs at load (the fastest counts)
COST_PROBE_TOKENS = 8  # the larger pass of the step-cost measurement


def time_decode(ctx: Any, tokens: list[int]) -> float:
    """Seconds of the fastest of TIMED_REPEATS passes of `tokens` (logits at every one; after one warm-up) in
    sequence 0, which is left empty. At load, before any request."""
    batch = TokenBatch(len(tokens))
    memory = llama_cpp.llama_get_memory(ctx)
    times = []
    for _ in range(TIMED_REPEATS + 1):
        batch.set(tokens, list(range(len(tokens))), [0] * len(tokens))
        for i in range(len(tokens)):
            batch.logits[i] = 1
        start_s = time.perf_counter()
        status = llama_cpp.llama_decode(ctx, batch.batch)
        times.append(time.perf_counter() - start_s)
        llama_cpp.llama_memory_seq_rm(memory, 0, 0, -1)
        if status != 0:
            raise RuntimeError(f"llama_decode failed with status {status} while timing a model")
    return min(times[1:])


def measure_pass_cost(ctx: Any, token: int) -> PassCost:
    """What a pass costs: a line through a 2-token and a COST_PROBE_TOKENS-token pass, and a lone token's pass.
    A memory-bound chip reads every weight once per pass whatever n (fixed of tens of per-token); a CPU whose cache
    holds a small model computes each token anew (fixed near per-token)."""
    token = max(token, 0)
    one = time_decode(ctx, [token])
    two = time_decode(ctx, [token] * 2)
    many = time_decode(ctx, [token] * COST_PROBE_TOKENS)
    per_token = max((many - two) / (COST_PROBE_TOKENS - 2), one / 100)
    fixed = max(two - 2 * per_token, per_token / 4)
    log.info("a pass of n >= 2 tokens takes %.2f + %.2f·n ms, of one token %.2f ms",
             fixed * 1e3, per_token * 1e3, one * 1e3)
    return PassCost(fixed, per_token, one)


@dataclass(frozen=True)
class LlamaCppSpec:
    """Everything a process needs to build the executor; picklable."""

    model_path: Path
    settings: ContextSettings
    energy_meter: str = "auto"
    cpu_tdp_w: float | None = None
    tiers: TierSettings = field(default_factory=TierSettings)  # the prompt cache beyond the slots
    draft_model_path: Path | None = None  # --speculative draft: a second model drafting for this one
    measure_step_cost: bool = False  # speculation: time a pass's fixed cost against its per-token cost at load

    def create(self) -> LlamaCppExecutor:
        return LlamaCppExecutor(self)


class LlamaCppExecutor:
    """Owns the model, the llama_context and the batch buffers; runs one batch per call, from one thread."""

    def __init__(self, spec: LlamaCppSpec) -> None:
        settings = spec.settings
        self.model = model = LlamaModel(spec.model_path)
        self.settings = settings
        self.ctx = new_context(model, settings)
        self.memory = llama_cpp.llama_get_memory(self.ctx)
        self.context_length = llama_cpp.llama_n_ctx_seq(self.ctx)  # what llama.cpp actually allocated
        self.n_batch = llama_cpp.llama_n_batch(self.ctx)
        self.meter = StepMeter(open_meter(spec.energy_meter, spec.cpu_tdp_w))
        self.facts = ExecutorFacts(
            context_length=self.context_length, num_slots=settings.num_slots, batch_tokens=self.n_batch,
            chip=_chip(settings.threads), energy_source=self.meter.meter.source,
        )

        self.batch = TokenBatch(self.n_batch)
        self.samplers: dict[str, RequestSampler] = {}
        self.restarts = 0
        self.tiers = KVTiers(_LlamaSequences(self.ctx, self.memory), spec.tiers,
                             _state_identity(spec.model_path, settings, self.context_length))
        if spec.measure_step_cost:
            self.facts = replace(self.facts, pass_cost_s=measure_pass_cost(self.ctx, model.bos_id))
        self.drafter: DraftModel | None = None
        if spec.draft_model_path is not None:
            from qanat.engine.executors.draft_model import DraftModel  # it imports this module

            try:
                self.drafter = DraftModel(spec.draft_model_path, spec.model_path, model, settings)
                self.facts = replace(self.facts, draft_cost=self.drafter.measure_cost(self.ctx))
            except BaseException:
                self.close()
                raise

    def is_alive(self) -> bool:
        return self.ctx is not None

    def restart(self) -> None:
        raise ExecutorStartError("an in-process llama.cpp executor cannot restart; run it in a ProcessExecutor")

    def close(self) -> None:
        self.tiers.close()  # waits for the disk tier's pending writes
        for sampler in self.samplers.values():
            sampler.close()
        self.samplers.clear()
        if self.drafter is not None:
            self.drafter.close()
            self.drafter = None
        if self.ctx:
            llama_cpp.llama_free(self.ctx)
            self.ctx = None
        self.model.close()

    def execute(self, batch: StepBatch) -> StepResult:
        start_s = time.perf_counter()
        idle_j = self.meter.begin()
        for request_id in batch.released:
            sampler = self.samplers.pop(request_id, None)
            if sampler is not None:
                sampler.close()
        refused: dict[str, Refusal] = {}
        for request_id, params in batch.new_requests:
            try:
                self.samplers[request_id] = RequestSampler(self.model, params, penalty_window=self.context_length)
            except InvalidRequestError as e:
                refused[request_id] = Refusal(str(e), e.param)
        extra: dict[str, list[int]] = {}
        extra_logprobs: dict[str, list[SampledLogprobs]] = {}
        drafted: dict[str, int] = {}
        sampled, logprobs = self._run(batch, refused, extra, extra_logprobs, drafted)
        return StepResult(sampled, logprobs, refused, self.meter.end(idle_j), time.perf_counter() - start_s,
                          kv_cache=self.tiers.take_report(), extra_tokens=extra, extra_logprobs=extra_logprobs,
                          drafted=drafted)

    def _run(self, batch: StepBatch, refused: dict[str, Refusal], extra: dict[str, list[int]],
             extra_logprobs: dict[str, list[SampledLogprobs]], drafted: dict[str, int]
             ) -> tuple[dict[str, int], dict[str, SampledLogprobs]]:
        """One llama_decode; sampled tokens returned, those kept after verified drafts put in `extra`."""
        failed = self.tiers.apply(batch.cache_ops)  # saves, restores, copies, trims; in order
        chunks = [c for c in batch.chunks if c.request_id not in refused and c.seq_id not in failed]
        if self.drafter is not None:
            # The draft model follows the target's sequences, then guesses for the chunks granted a draft_len.
            self.drafter.apply(batch.cache_ops, failed, self.tiers.entry_tokens)
            self.drafter.observe(chunks)
            drafts = self.drafter.draft([c for c in chunks if c.draft_len])
            drafted.update((request_id, len(d)) for request_id, d in drafts.items())
            chunks = [replace(c, draft_ids=drafts[c.request_id]) if c.request_id in drafts else c for c in chunks]
        if not chunks:
            return {}, {}

        tokens: list[int] = []
        positions: list[int] = []
        seq_ids: list[int] = []
        sample_at: list[tuple[str, int]] = []  # (request_id, batch index whose logits we sample)
        verify: list[tuple[ExecChunk, int]] = []  # chunks with drafts, and their last real token's batch index
        # Sequence order matters: with a stream per sequence llama.cpp splits the batch into one pass per run
        # of consecutive seq ids, in batch order. Sorted, 16 decodes take one pass (≈100 ms here), not up
        # to 16 (≈150 ms shuffled).
        for chunk in sorted(chunks, key=lambda c: c.seq_id):
            n = len(chunk.token_ids) + len(chunk.draft_ids)
            tokens += chunk.token_ids
            tokens += chunk.draft_ids
            positions += range(chunk.start_pos, chunk.start_pos + n)
            seq_ids += [chunk.seq_id] * n
            if chunk.draft_ids:
                verify.append((chunk, len(tokens) - n + len(chunk.token_ids) - 1))
            elif chunk.needs_logits:
                sample_at.append((chunk.request_id, len(tokens) - 1))
        n_tokens = len(tokens)
        # More than n_batch tokens, or sampling where no logits were asked for, aborts the whole process.
        if n_tokens > self.n_batch:
            raise RuntimeError(f"plan has {n_tokens} tokens, more than n_batch={self.n_batch}")
        self.batch.set(tokens, positions, seq_ids)
        for _, index in sample_at:
            self.batch.logits[index] = 1
        for chunk, index in verify:
            self.batch.logits[index:index + 1 + len(chunk.draft_ids)] = 1

        status = llama_cpp.llama_decode(self.ctx, self.batch.batch)
        if status != 0:
            raise RuntimeError(f"llama_decode failed with status {status}")

        sampled: dict[str, int] = {}
        logprobs: dict[str, SampledLogprobs] = {}
        for request_id, index in sample_at:
            sampled[request_id], sampled_logprobs = self._sample(self.samplers[request_id], index)
            if sampled_logprobs is not None:
                logprobs[request_id] = sampled_logprobs
        for chunk, index in verify:
            kept, kept_logprobs = self._verify(chunk, index)
            sampled[chunk.request_id] = kept[0]
            extra[chunk.request_id] = kept[1:]
            if kept_logprobs:
                logprobs[chunk.request_id] = kept_logprobs[0]
                extra_logprobs[chunk.request_id] = kept_logprobs[1:]
        return sampled, logprobs

    def _sample(self, sampler: RequestSampler, index: int) -> tuple[int, SampledLogprobs | None]:
        """The request's pick from the logits at batch `index`, and its logprobs when it asked for them (from the
        raw distribution, read before sampling)."""
        if sampler.argmax_only and sampler.logprobs is None:
            logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self.ctx, index), (self.model.n_vocab,))
            return int(logits.argmax()), None
        if sampler.logprobs is not None:
            raw = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self.ctx, index), (self.model.n_vocab,))
            token = llama_cpp.llama_sampler_sample(sampler.ptr, self.ctx, index)
            return token, _logprobs(raw, token, sampler.logprobs)
        return llama_cpp.llama_sampler_sample(sampler.ptr, self.ctx, index), None

    def _verify(self, chunk: ExecChunk, index: int) -> tuple[list[int], list[SampledLogprobs]]:
        """Sample position after position with the request's own chain (which accepts each token it picks, so
        grammars, penalties and its random stream advance as without drafts), while the drafts equal the picks.
        Then drop the KV of the drafts that were not kept."""
        sampler = self.samplers[chunk.request_id]
        kept: list[int] = []
        kept_logprobs: list[SampledLogprobs] = []
        for offset in range(len(chunk.draft_ids) + 1):
            token, sampled_logprobs = self._sample(sampler, index + offset)
            if sampled_logprobs is not None:
                kept_logprobs.append(sampled_logprobs)
            kept.append(token)
            if offset == len(chunk.draft_ids) or token != chunk.draft_ids[offset]:
                break
        accepted = len(kept) - 1
        if accepted < len(chunk.draft_ids):
            first_rejected = chunk.start_pos + len(chunk.token_ids) + accepted
            llama_cpp.llama_memory_seq_rm(self.memory, chunk.seq_id, first_rejected, -1)
        if self.drafter is not None and chunk.draft_len:
            self.drafter.settle(chunk, accepted)
        return kept, kept_logprobs


class TokenBatch:
    """A llama_batch whose arrays live in numpy (llama_batch points into them): filling it is a few slice copies."""

    def __init__(self, capacity: int) -> None:
        self.token = np.zeros(capacity, dtype=np.int32)
        self.pos = np.zeros(capacity, dtype=np.int32)
        self.n_seq_id = np.ones(capacity, dtype=np.int32)
        self.seq_id = np.zeros(capacity, dtype=np.int32)
        self.logits = np.zeros(capacity, dtype=np.int8)  # 1 where llama_decode keeps logits
        size = self.seq_id.itemsize
        self._seq_id_ptrs = (ctypes.POINTER(llama_cpp.llama_seq_id) * capacity)(*(
            ctypes.cast(self.seq_id.ctypes.data + i * size, ctypes.POINTER(llama_cpp.llama_seq_id))
            for i in range(capacity)
        ))
        self.batch = llama_cpp.llama_batch(
            n_tokens=0,
            token=self.token.ctypes.data_as(ctypes.POINTER(llama_cpp.llama_token)),
            embd=None,
            pos=self.pos.ctypes.data_as(ctypes.POINTER(llama_cpp.llama_pos)),
            n_seq_id=self.n_seq_id.ctypes.data_as(ctypes.POINTER(ctypes.c_int32)),
            seq_id=self._seq_id_ptrs,
            logits=self.logits.ctypes.data_as(ctypes.POINTER(ctypes.c_int8)),
        )

    def set(self, tokens: list[int], positions: list[int], seq_ids: list[int]) -> None:
        """The batch's tokens, with no logits asked for yet (set `logits[i] = 1` where they are wanted)."""
        n = len(tokens)
        self.token[:n] = tokens
        self.pos[:n] = positions
        self.seq_id[:n] = seq_ids
        self.logits[:n] = 0
        self.batch.n_tokens = n


class _LlamaSequences:
    """llama.cpp's sequences as the prompt cache's tiers use them (`kv_tiers.SequenceKV`)."""

    def __init__(self, ctx: Any, memory: Any) -> None:
        self.ctx = ctx
        self.memory = memory

    def state_size(self, seq_id: int) -> int:
        return int(llama_cpp.llama_state_seq_get_size_ext(self.ctx, seq_id, 0))

    def read_state(self, seq_id: int, dst: mmap.mmap) -> int:
        buf = (ctypes.c_uint8 * len(dst)).from_buffer(dst)
        try:
            return int(llama_cpp.llama_state_seq_get_data_ext(self.ctx, buf, len(dst), seq_id, 0))
        finally:
            del buf  # release the mapping's export, so it can be unmapped

    def write_state(self, seq_id: int, src: mmap.mmap, nbytes: int) -> bool:
        buf = (ctypes.c_uint8 * len(src)).from_buffer(src)
        try:
            # It clears the sequence first; 0 means the state did not fit or did not parse (the sequence is empty).
            return int(llama_cpp.llama_state_seq_set_data_ext(self.ctx, buf, nbytes, seq_id, 0)) == nbytes
        finally:
            del buf

    def copy(self, src_seq_id: int, dst_seq_id: int) -> None:
        # Across streams llama.cpp copies whole sequences only; the tail is trimmed by the next `keep`.
        llama_cpp.llama_memory_seq_cp(self.memory, src_seq_id, dst_seq_id, -1, -1)

    def keep(self, seq_id: int, n_tokens: int) -> None:
        llama_cpp.llama_memory_seq_rm(self.memory, seq_id, n_tokens, -1)


def _state_identity(model_path: Path, settings: ContextSettings, context_length: int) -> dict[str, str | int]:
    """What a saved sequence state depends on: its disk files are refused under anything else. The model file
    (size and a hash of its first MiB: the GGUF header, its metadata and the first tensors), the llama.cpp
    build, and the settings that shape the KV (cells per sequence, flash attention transposes V)."""
    with model_path.open("rb") as f:
        head = hashlib.sha256(f.read(1 << 20)).hexdigest()
    lib = Path(llama_cpp.llama_cpp._lib._name)  # type: ignore[attr-defined]
    return {
        "model_bytes": model_path.stat().st_size, "model_sha256_1mib": head,
        "llama_cpp": llama_cpp.__version__, "libllama_bytes": lib.stat().st_size if lib.exists() else 0,
        "system": llama_cpp.llama_print_system_info().decode(errors="replace").strip(),
        "context_length": context_length, "flash_attn": flash_attention_mode(settings.flash_attn),
        "kv_type": "f16",
    }


def _chip(threads: int) -> str:
    if llama_cpp.llama_supports_gpu_offload():
        return f"llama.cpp with GPU offload; host cpu: {cpu_model()}"
    return f"cpu: {cpu_model()} ({threads} threads)"


def _logprobs(logits: np.ndarray, token_id: int, k: int) -> SampledLogprobs:
    shifted = logits.astype(np.float64) - logits.max()
    log_probs = shifted - np.log(np.exp(shifted).sum())
    top: tuple[tuple[int, float], ...] = ()
    if k > 0:
        idx = np.argpartition(log_probs, -k)[-k:]
        idx = idx[np.argsort(log_probs[idx])[::-1]]
        top = tuple((int(i), float(log_probs[i])) for i in idx)
    return SampledLogprobs(token_id=token_id, logprob=float(log_probs[token_id]), top=top)

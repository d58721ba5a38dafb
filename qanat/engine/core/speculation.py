"""Speculative decoding's policy: which drafted tokens ride along with a decoding request in the next step.

Drafts come from one of two sources. `ngram` (prompt lookup): the earlier place in the request's prompt or output
that matches the end of its tokens the longest is continued with what followed it there. Rewriting, extraction,
code edits and JSON that quotes its input repeat their context, so these guesses are often right, and they cost
nothing to make. `draft`: a small model sharing the target's vocabulary, living in the executor
next to the target (`executors/draft_model.py`), drafts greedily; here the policy only grants each request a
draft length, and the executor fills it. Those guesses cost a draft pass per drafted position.

Verifying is not free, though, and how much it costs decides everything. On this project's CPU with the AVX-512
kernels a pass of 1 + k tokens of one sequence costs about a + b·(1 + k) with a ≈ 0.6–1.75 b by the day
(`bench/verify_cost.py`): the weights sit in a 480 MB L3 cache, so a pass is compute-bound and each extra token
costs nearly as much as a decode step's own token. With ggml's AMX tiles (same CPU) a ≈ 8 b for passes of two
tokens or more, while a lone token takes another kernel, ≈ 6 b: the first draft token pays for leaving it
(`StepCostFit.one_token_tokens`, `Speculator._lone_length`). (On a GPU, where a decode step reads every weight
from memory, a is tens of b.)
llama-server drafts up to 16 tokens whatever the odds; here a draft token goes into the step only while it pays:

    a token that is kept with probability p is worth adding iff p > U / (F + n)

where n is the step's token count so far, U the useful tokens among them (each real token counts 1, each draft
token its p), and F = a / b, the step's fixed cost in tokens. It is the condition for the step's useful tokens
per unit of time to rise. With F = 1.75 a lone stream drafts when p > 0.36; beside 15 other decodes only when
p > 0.9; in a step that carries a prompt chunk, practically never — speculation steps aside where the batch
already fills the machine. F is measured (`StepCostFit`), p learnt (below): the j-th draft token's p is the product
of each token's chance of being kept given the match behind it (see BUCKET_EDGES).

A draft model adds passes of its own: one per draft position, every request drafting at that position batched
in it, a pass of m tokens costing r·(F + m) in the same units, r being a draft pass's time over a target pass's
(the executor times both models at load). The same condition, useful tokens per unit of time rising, becomes

    p > U·Δ / D,  D = F + n + r·Σ_j (F + m_j),  Δ = 1 + r·(1 + F if the token opens a new draft position else 1)

D being the step's whole cost and Δ what the token adds to it; with r = 0 (n-grams) it is the rule above. A model
drafting for itself (r ≈ 1) never pays: its first token alone would need p > 1.36 at F = 1.75. A draft a tenth
of the target's cost needs p > 0.46 there, and p > 0.15 on a memory-bound chip where F ≈ 20.

Verification (in the executor) samples each position with the request's own sampler chain and keeps the drafts
while they equal what was sampled, plus the first token that differs (or one past the last draft): drafts are
deterministic guesses (a point-mass draft distribution), for which this is exactly Leviathan et al.'s rejection
rule, so greedy and sampled outputs keep the target's distribution, and grammars, penalties and seeded random
streams see the same tokens in the same order as without speculation.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field

from qanat.engine.core.request import Request, RequestState
from qanat.engine.executors.base import PassCost

SPECULATIVE_MODES = ("off", "ngram", "draft")
MATCH_MAX = 32  # prompt lookup measures a match back to this many tokens
CANDIDATES = 8  # the latest occurrences of the last two tokens whose match is measured

# F: a decode step's fixed cost in units of one more token's cost. The executor measures it at load (a one-token
# pass against an eight-token pass); this is the fallback, measured on this project's CPU with the embedded
# model (bench/verify_cost.py). Larger F (accelerators, bigger models) makes drafting pay sooner.
STEP_FIXED_COST_TOKENS = 1.75

# How likely a drafted token is kept depends most on how long the match behind it is: a continuation that has
# followed the source for 20 tokens will likely follow it for one more; one that matched on two tokens is a
# guess. So acceptance is kept per match-length bucket, as the chance that a token is kept given that the draft
# tokens before it were: the j-th token of a draft whose match was m tokens long rides on a match of m + j − 1.
# Each bucket starts from a prior (see _prior: 0.33 after one token, 0.88 after 7–9), learns server-wide (the
# workload's own rates, fading slowly) and per request (fading by DECAY per verified position, so a request that
# stops copying its context stops drafting within a step or two). In a step where a draft was found but not worth
# sending, the request's counts fade by IDLE_DECAY toward the server's rates, so it tries again now and then.
BUCKET_EDGES = (1, 2, 3, 4, 6, 9, 14, 22, MATCH_MAX + 1)  # bucket i holds match lengths up to BUCKET_EDGES[i]
PRIOR_TRIALS = 2.0  # what the prior (and the server's rate, in a request's estimate) weighs, in verified tokens
SERVER_DECAY = 0.998  # per verified position, server-wide
DECAY = 0.8  # per verified position, per request
IDLE_DECAY = 0.9
# No draft is ever certain: capping each token's chance keeps a long run of hits from drafting into a full step.
MAX_ACCEPTANCE = 0.99


def bucket_of(match: int) -> int:
    return next(i for i, edge in enumerate(BUCKET_EDGES) if match <= edge)


@dataclass(frozen=True)
class SpeculationConfig:
    mode: str = "off"  # off | ngram | draft
    draft_max: int = 16  # most drafted tokens per request and step
    ngram_min: int = 2  # shortest match prompt lookup may continue
    step_fixed_cost_tokens: float = STEP_FIXED_COST_TOKENS
    # A draft model's pass over the target's pass of as many tokens (r above); 0 for n-grams, which cost nothing.
    draft_cost: float = 0.0
    # Every request that can draft gets at least this many draft tokens (as far as its draft, max_tokens and the
    # step's budget allow), whatever the cost rule says: 0 leaves the rule alone; draft_min = draft_max fixes
    # the length (tests, and measuring what a given length does).
    draft_min: int = 0
    # What a pass costs, as the executor timed it at load; None: F stays at step_fixed_cost_tokens.
    pass_cost_s: PassCost | None = None

    @property
    def enabled(self) -> bool:
        return self.mode != "off"

    @property
    def uses_draft_model(self) -> bool:
        """Drafts are made by the executor's draft model: the policy grants lengths, not tokens."""
        return self.mode == "draft"


class SuffixIndex:
    """Prompt lookup over a growing token list: the earlier occurrence that matches the longest suffix of the list
    (up to MATCH_MAX tokens, among the CANDIDATES latest occurrences of its last two tokens, or the latest
    occurrence of its last token alone when `min_match` is 1), and what followed it.

    Incremental: each new token adds one pair and one token to the index, so a lookup costs O(CANDIDATES) short
    comparisons per step."""

    def __init__(self, min_match: int) -> None:
        self.min_match = min_match
        self._pairs: dict[tuple[int, int], list[int]] = {}  # (t[i-1], t[i]) -> every i, ascending
        self._latest: dict[int, int] = {}  # t[i] -> latest i
        self._indexed = 0  # positions below this are indexed; only those followed by a token are

    def extend(self, tokens: list[int]) -> None:
        """Index what `tokens` (the whole list so far; it only grows) added since the last call."""
        for i in range(self._indexed, len(tokens) - 1):
            self._latest[tokens[i]] = i
            if i:
                self._pairs.setdefault((tokens[i - 1], tokens[i]), []).append(i)
        self._indexed = max(self._indexed, len(tokens) - 1)

    def draft(self, tokens: list[int], k: int) -> tuple[list[int], int]:
        """Up to k tokens that followed the best earlier match of the end of `tokens`, and that match's length."""
        end = len(tokens) - 1
        best, match = -1, 0
        if end >= 1:
            for i in reversed(self._pairs.get((tokens[end - 1], tokens[end]), [])[-CANDIDATES:]):
                m = 2
                while m < MATCH_MAX and m <= i and tokens[i - m] == tokens[end - m]:
                    m += 1
                if m > match:
                    best, match = i, m
        if best < 0 and self.min_match == 1 and end >= 0 and (i := self._latest.get(tokens[end], -1)) >= 0:
            best, match = i, 1
        if best < 0 or match < self.min_match:
            return [], 0
        # What followed the match, and where that runs into the end of the list (a loop: the text repeats with
        # period end - best), what follows it in turn.
        period = end - best
        return [tokens[best + 1 + j % period] for j in range(k)], match


@dataclass
class _Counts:
    """Decayed counts of drafted tokens kept and verified, per match-length bucket."""

    kept: list[float] = field(default_factory=lambda: [0.0] * len(BUCKET_EDGES))
    trials: list[float] = field(default_factory=lambda: [0.0] * len(BUCKET_EDGES))

    def fade(self, factor: float) -> None:
        self.kept = [k * factor for k in self.kept]
        self.trials = [t * factor for t in self.trials]

    def learn(self, match: int, drafted: int, accepted: int, decay: float) -> None:
        verified = min(accepted + 1, drafted)  # the kept tokens, then the first rejected one
        self.fade(decay ** verified)
        for j in range(verified):
            b = bucket_of(min(match + j, MATCH_MAX)) if match else 0  # 0: a draft model's, one rate
            self.kept[b] += j < accepted
            self.trials[b] += 1


def _prior(bucket: int) -> float:
    """A copy that has held for m tokens breaks at the next with a chance of about 1 / (m + ½) (measured on the
    embedded model's answers to rewriting, extraction and code prompts: 0.32 kept after a one-token match, 0.75–0.8
    after 4–9, 0.97 after 23 or more); m is the bucket's middle."""
    low = BUCKET_EDGES[bucket - 1] + 1 if bucket else 1
    match = (low + BUCKET_EDGES[bucket]) / 2
    return (match - 0.5) / (match + 0.5)


@dataclass
class _RequestState:
    index: SuffixIndex
    counts: _Counts = field(default_factory=_Counts)
    last_match: int = 0  # match length behind the draft now being verified


class StepCostFit:
    """F, learnt from the engine's own decode steps: a least-squares fit of a step's time to a + b·n over steps of
    n >= 2 tokens, so that F = a / b follows what a step really costs here — the engine's own per-step work, the
    contexts' length, other load on the machine — and apart from it what a lone token's step costs, in units of b
    (`one_token_tokens`; below F + 1 where the matmul switches kernels past one row). The executor's measurement at
    load is the prior: it weighs PRIOR_STEPS steps and never fades, so the fit cannot wander off on a few noisy
    steps, nor sink so low that nothing drafts and no more spread of n comes in. Observed steps fade by DECAY each;
    a step more than CLIP times off the current fit (the machine stalled) counts as CLIP times off. Without a
    measurement (a fake executor) F stays as configured and a lone token's step lies on the line."""

    DECAY = 0.99  # per observed step: about the last hundred steps count
    PRIOR_STEPS = 20.0
    CLIP = 3.0
    FLOOR, CEILING = 0.25, 100.0  # a pass always has some fixed cost; past a hundred tokens' worth it hardly matters

    def __init__(self, fixed_cost_tokens: float, pass_cost_s: PassCost | None = None) -> None:
        self.fixed_cost_tokens = fixed_cost_tokens
        self._prior = [0.0] * 5  # Σw, Σw·n, Σw·n², Σw·t, Σw·n·t over steps of two tokens or more
        self._seen = [0.0] * 5
        self._fit: tuple[float, float] | None = None
        self._one_token = [0.0, 0.0]  # Σw, Σw·t over lone tokens' steps observed (the prior: one_token_tokens)
        self._one_token_prior_s = 0.0
        if pass_cost_s is not None:
            fixed, per_token, one_token = pass_cost_s
            for n in (2, 8):
                self._prior = self._add(self._prior, self.PRIOR_STEPS / 2, n, fixed + per_token * n)
            self._one_token_prior_s = one_token
            self._refit()

    @property
    def one_token_tokens(self) -> float:
        """A lone token's step, in units of one more token's cost."""
        if self._fit is None:
            return self.fixed_cost_tokens + 1
        w, wt = self._one_token
        seconds = (wt + self.PRIOR_STEPS * self._one_token_prior_s) / (w + self.PRIOR_STEPS)
        return min(seconds / self._fit[1], self.fixed_cost_tokens + 1)

    @staticmethod
    def _add(sums: list[float], weight: float, n: int, seconds: float) -> list[float]:
        w, wn, wnn, wt, wnt = sums
        return [w + weight, wn + weight * n, wnn + weight * n * n, wt + weight * seconds, wnt + weight * n * seconds]

    def observe(self, tokens: int, seconds: float) -> None:
        if self._fit is None:
            return
        fixed, per_token = self._fit
        expected = fixed + per_token * tokens if tokens > 1 else per_token * self.one_token_tokens
        seconds = min(max(seconds, expected / self.CLIP), expected * self.CLIP)
        if tokens == 1:
            w, wt = self._one_token
            self._one_token = [w * self.DECAY + 1, wt * self.DECAY + seconds]
            return
        self._seen = self._add([x * self.DECAY for x in self._seen], 1.0, tokens, seconds)
        self._refit()

    def _refit(self) -> None:
        w, wn, wnn, wt, wnt = (p + s for p, s in zip(self._prior, self._seen, strict=True))
        spread = wnn / w - (wn / w) ** 2
        per_token = (wnt / w - wn / w * wt / w) / spread
        fixed = wt / w - per_token * wn / w
        if per_token > 0:
            self._fit = (max(fixed, 0.0), per_token)
            self.fixed_cost_tokens = min(max(fixed / per_token, self.FLOOR), self.CEILING)


@dataclass
class SpeculationStats:
    drafts: int = 0  # verifications that carried at least one draft token
    draft_tokens: int = 0
    accepted_tokens: int = 0


@dataclass
class Speculator:
    """Proposes drafts for decoding requests and learns what is kept, per request and server-wide. Engine thread
    only."""

    config: SpeculationConfig
    stats: SpeculationStats = field(default_factory=SpeculationStats)
    _states: dict[str, _RequestState] = field(default_factory=dict)
    _server: _Counts = field(default_factory=_Counts)
    step_cost: StepCostFit = field(init=False)

    def __post_init__(self) -> None:
        self.step_cost = StepCostFit(self.config.step_fixed_cost_tokens, self.config.pass_cost_s)

    def can_draft(self, request: Request) -> bool:
        return (self.config.enabled and request.params.speculative and request.state is RequestState.DECODING
                and not request.is_replaying and request.max_tokens - len(request.output_ids) > 1)

    def propose(self, decoding: list[Request], batch_tokens: int, budget: int) -> dict[str, list[int]]:
        """Prompt-lookup drafts worth verifying in a step that already carries `batch_tokens` tokens, at most
        `budget` in all. `decoding`: the requests that get one decode token in this step."""
        candidates: list[tuple[str, list[float]]] = []
        drafts: dict[str, list[int]] = {}
        matches: dict[str, tuple[_RequestState, int]] = {}
        for request in decoding:
            if not self.can_draft(request):
                continue
            state = self._state(request.request_id)
            tokens = request.all_token_ids
            state.index.extend(tokens)
            draft, match = state.index.draft(tokens, self._room(request))
            if draft:
                candidates.append((request.request_id, self._chances(state, match, len(draft))))
                drafts[request.request_id] = draft
                matches[request.request_id] = (state, match)
        chosen = self.choose_lengths(candidates, batch_tokens, budget)
        for request_id, (state, match) in matches.items():
            if request_id in chosen:
                state.last_match = match
            else:
                state.counts.fade(IDLE_DECAY)
        return {request_id: drafts[request_id][:length] for request_id, length in chosen.items()}

    def propose_lengths(self, decoding: list[Request], batch_tokens: int, budget: int) -> dict[str, int]:
        """How many tokens the executor's draft model should draft for each request (those worth it only). A draft
        model's guesses have no match length: each request's acceptance is one rate (bucket 0)."""
        candidates = []
        for request in decoding:
            if self.can_draft(request) and (room := self._room(request)) > 0:
                alpha = self._rate(self._state(request.request_id).counts, 0)
                candidates.append((request.request_id, [alpha ** j for j in range(1, room + 1)]))
        chosen = self.choose_lengths(candidates, batch_tokens, budget)
        for request_id, _ in candidates:
            if request_id not in chosen:
                self._state(request_id).counts.fade(IDLE_DECAY)
        return chosen

    def choose_lengths(self, candidates: list[tuple[str, list[float]]], batch_tokens: int, budget: int
                       ) -> dict[str, int]:
        """Draft lengths for (request id, chances) candidates, chances[j] being the chance that the draft's first
        j + 1 tokens are all kept (falling with j; as many as the longest possible draft): the `draft_min` floor
        first, then token after token, the likeliest kept first, while each pays (see the module's docstring).
        At most `budget` tokens in all."""
        if not candidates or budget <= 0:
            return {}
        if batch_tokens == 1 and len(candidates) == 1:
            return self._lone_length(*candidates[0], budget)
        fixed, ratio = self.step_cost.fixed_cost_tokens, self.config.draft_cost
        chosen: dict[str, int] = {}
        depth_tokens: list[int] = []  # m_j: tokens in the draft model's pass for draft position j (from 0)
        useful, cost = float(batch_tokens), fixed + batch_tokens  # U, D

        def add(i: int, length: int) -> None:  # the length-th draft token (from 1) of candidate i
            nonlocal useful, cost, budget
            request_id, chances = candidates[i]
            chosen[request_id] = length
            if len(depth_tokens) < length:
                depth_tokens.append(0)
                cost += ratio * fixed
            depth_tokens[length - 1] += 1
            useful += chances[length - 1]
            cost += 1 + ratio
            budget -= 1

        heap: list[tuple[float, int, int]] = []  # (-p, candidate, draft length), for each candidate's next token
        for i, (_, chances) in enumerate(candidates):
            length = 0
            while length < min(self.config.draft_min, len(chances)) and budget > 0:
                length += 1
                add(i, length)
            if length < len(chances):
                heap.append((-chances[length], i, length + 1))
        heapq.heapify(heap)
        while heap and budget > 0:
            neg_p, i, length = heapq.heappop(heap)
            group = [(-neg_p, i)]
            if ratio and len(depth_tokens) < length:
                # A new draft position: its pass's fixed cost r·F is shared by every request drafting there, so
                # the decision is the group's — the likeliest of the requests that could draft at this position,
                # as many as raise the step's rate the most (one alone may not pay where two together do).
                group += sorted(((-q, j) for q, j, n in heap if n == length), reverse=True)
                best, best_rate, total_p = 0, useful / cost, 0.0
                for size, (p, _) in enumerate(group[:budget], start=1):
                    total_p += p
                    rate = (useful + total_p) / (cost + ratio * fixed + size * (1 + ratio))
                    if rate > best_rate:
                        best, best_rate = size, rate
                if best == 0:
                    break
                group = group[:best]
                taken = {j for _, j in group}
                heap = [entry for entry in heap if entry[1] not in taken]
                heapq.heapify(heap)
            elif -neg_p * cost <= useful * (1 + ratio):  # the best remaining token no longer pays for itself
                break
            for _, j in group:
                add(j, length)
                chances = candidates[j][1]
                if length < len(chances):
                    heapq.heappush(heap, (-chances[length], j, length + 1))
        return chosen

    def _lone_length(self, request_id: str, chances: list[float], budget: int) -> dict[str, int]:
        """One request decoding alone. Where the matmul switches kernels past one row, its first draft token also
        pays for the step's move off the lone-token kernel, and a token-by-token rule would refuse a long, likely
        draft whose first token alone does not pay; so the length is searched whole: the one whose step yields the
        most useful tokens per unit of time, a k-token draft's step costing F + 1 + k·(1 + r) + k·r·F."""
        fixed, ratio = self.step_cost.fixed_cost_tokens, self.config.draft_cost
        longest = min(len(chances), budget)
        shortest = min(self.config.draft_min, longest)
        best, best_rate, useful = 0, 1 / self.step_cost.one_token_tokens, 1.0
        for length in range(1, longest + 1):
            useful += chances[length - 1]
            rate = useful / (fixed + 1 + length * (1 + ratio) + length * ratio * fixed)
            if length <= shortest or rate > best_rate:
                best, best_rate = length, rate
        return {request_id: best} if best else {}

    def record(self, request_id: str, drafted: int, accepted: int) -> None:
        """What verifying a `drafted`-token draft kept."""
        self.stats.drafts += 1
        self.stats.draft_tokens += drafted
        self.stats.accepted_tokens += accepted
        state = self._state(request_id)
        state.counts.learn(state.last_match, drafted, accepted, DECAY)
        self._server.learn(state.last_match, drafted, accepted, SERVER_DECAY)

    def _chances(self, state: _RequestState, match: int, length: int) -> list[float]:
        """The chance that the first j + 1 tokens of a `length`-token draft after a `match`-token match are kept."""
        chances, p = [], 1.0
        for j in range(length):
            p *= self._rate(state.counts, bucket_of(min(match + j, MATCH_MAX)))
            chances.append(p)
        return chances

    def _rate(self, counts: _Counts, bucket: int) -> float:
        """A token's chance of being kept, the draft's earlier tokens having been: the request's counts over the
        server's rate, which starts from the prior."""
        server = ((self._server.kept[bucket] + PRIOR_TRIALS * _prior(bucket))
                  / (self._server.trials[bucket] + PRIOR_TRIALS))
        rate = (counts.kept[bucket] + PRIOR_TRIALS * server) / (counts.trials[bucket] + PRIOR_TRIALS)
        return min(rate, MAX_ACCEPTANCE)

    def _room(self, request: Request) -> int:
        """The longest draft: within --draft-max, and every verified token within max_tokens (1 + k tokens can
        come out of a k-token draft)."""
        return min(self.config.draft_max, request.max_tokens - len(request.output_ids) - 1)

    def forget(self, request_id: str) -> None:
        self._states.pop(request_id, None)

    def _state(self, request_id: str) -> _RequestState:
        state = self._states.get(request_id)
        if state is None:
            state = self._states[request_id] = _RequestState(SuffixIndex(self.config.ngram_min))
        return state

"""Speculative decoding's policy: which drafted tokens ride along with a decoding request in the next step.

Drafts come from one of two sources. `ngram` (prompt lookup): the longest recent n-gram that ends the request's
tokens and occurred before in its prompt or output is continued with what followed it there. Rewriting,
extraction, code edits and JSON that quotes its input repeat their context, so these guesses are often right,
and they cost nothing to make. `draft`: a small model sharing the target's vocabulary, living in the executor
next to the target (`executors/draft_model.py`), drafts greedily; here the policy only grants each request a
draft length, and the executor fills it. Those guesses cost a draft pass per drafted position.

Verifying is not free, though, and how much it costs decides everything. On this project's CPU a pass of
1 + k tokens of one sequence costs about a + b·(1 + k) with a ≈ 1.5 b (`bench/verify_cost.py`): the weights sit
in a 480 MB L3 cache, so a pass is compute-bound and each extra token costs nearly as much as a decode step's
own token. (On a GPU, where a decode step reads every weight from memory, a is tens of b.) llama-server drafts
up to 16 tokens whatever the odds and loses; here a draft token goes into the step only while it pays:

    a token that is kept with probability p is worth adding iff p > U / (F + n)

where n is the step's token count so far, U the useful tokens among them (each real token counts 1, each draft
token its p), and F = a / b, the step's fixed cost in tokens. It is the condition for the step's useful tokens
per unit of time to rise. A lone stream drafts when p > 0.36; beside 15 other decodes only when p > 0.9; in a
step that carries a prompt chunk, practically never — speculation steps aside where the batch already fills
the machine. p for the j-th draft token (from 1) is α^j, α being the request's recent per-token acceptance.

A draft model adds passes of its own: one per draft position, every request drafting at that position batched
in it, a pass of m tokens costing r·(F + m) in the same units, r being a draft pass's time over a target pass's
(the executor times both models at load). The same condition, useful tokens per unit of time rising, becomes

    p > U·Δ / D,  D = F + n + r·Σ_j (F + m_j),  Δ = 1 + r·(1 + F if the token opens a new draft position else 1)

D being the step's whole cost and Δ what the token adds to it; with r = 0 (n-grams) it is the rule above. A model
drafting for itself (r ≈ 1) never pays: its first token alone would need p > 1.36 on this CPU. A draft a tenth
of the target's cost needs p > 0.46 here, and p > 0.15 on a memory-bound chip where F ≈ 20.

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

SPECULATIVE_MODES = ("off", "ngram", "draft")
NGRAM_MAX = 5  # prompt lookup tries n-grams from this long down to --ngram-min

# F: a decode step's fixed cost in units of one more token's cost, measured on this project's CPU with the
# embedded model (bench/verify_cost.py: a pass of n ≤ 8 tokens ≈ 11 + 7.3·n ms, the second token only 5 ms;
# plus ≈ 1.5 ms of the engine's own per-step work): ≈ 1.75. Larger F (accelerators, bigger models) makes drafting
# pay sooner.
STEP_FIXED_COST_TOKENS = 1.75

# Acceptance estimate, per request and per length of the n-gram that matched (a 5-token match predicts better
# than a 2-token one): counts that start as a prior worth PRIOR_TRIALS drafted positions at PRIOR_ACCEPTANCE and
# fade by DECAY per newly verified position, so a request that stops repeating its context stops drafting within
# a step or two, and one that keeps repeating it soon drafts long. In a step where a draft was found but not
# worth sending, the counts drift back toward the prior by IDLE_DECAY, so the request tries again now and then:
# after one rejection ≈15 steps later, after two ≈27 (a retry costs a quarter to a third of a step).
PRIOR_ACCEPTANCE = 0.5
PRIOR_TRIALS = 2.0
DECAY = 0.8
IDLE_DECAY = 0.95
# No draft is ever certain: capping the estimate keeps a long run of hits from drafting into a prompt-filled step.
MAX_ACCEPTANCE = 0.99


@dataclass(frozen=True)
class SpeculationConfig:
    mode: str = "off"  # off | ngram | draft
    draft_max: int = 16  # most drafted tokens per request and step
    ngram_min: int = 2  # shortest n-gram that may be looked up
    ngram_max: int = NGRAM_MAX  # longest n-gram tried first
    step_fixed_cost_tokens: float = STEP_FIXED_COST_TOKENS
    # A draft model's pass over the target's pass of as many tokens (r above); 0 for n-grams, which cost nothing.
    draft_cost: float = 0.0
    # Every request that can draft gets at least this many draft tokens (as far as its draft, max_tokens and the
    # step's budget allow), whatever the cost rule says: 0 leaves the rule alone; draft_min = draft_max fixes
    # the length (tests, and measuring what a given length does).
    draft_min: int = 0

    @property
    def enabled(self) -> bool:
        return self.mode != "off"

    @property
    def uses_draft_model(self) -> bool:
        """Drafts are made by the executor's draft model: the policy grants lengths, not tokens."""
        return self.mode == "draft"


class NgramIndex:
    """Where each n-gram of a growing token list last occurred with at least one token after it.

    Incremental: each new token adds one n-gram per length, so a lookup costs O(ngram_max) per step."""

    def __init__(self, n_min: int, n_max: int) -> None:
        self.n_min = n_min
        self.n_max = n_max
        self._last_start: dict[tuple[int, ...], int] = {}  # n-gram -> start of its latest followed occurrence
        self._indexed = dict.fromkeys(range(n_min, n_max + 1), 0)  # per n: starts below this are indexed

    def extend(self, tokens: list[int]) -> None:
        """Index what `tokens` (the whole list so far; it only grows) added since the last call."""
        for n, indexed in list(self._indexed.items()):
            # The n-gram starting at s is followed by a token once s + n < len(tokens).
            for start in range(indexed, len(tokens) - n):
                self._last_start[tuple(tokens[start:start + n])] = start
            self._indexed[n] = max(indexed, len(tokens) - n)

    def draft(self, tokens: list[int], k: int) -> tuple[list[int], int]:
        """Up to k tokens that followed the longest n-gram ending `tokens` where it occurred before, and n."""
        for n in range(min(self.n_max, len(tokens) - 1), self.n_min - 1, -1):
            start = self._last_start.get(tuple(tokens[-n:]))
            if start is not None:
                return tokens[start + n:start + n + k], n
        return [], 0


@dataclass
class _RequestState:
    index: NgramIndex
    # Per matched n-gram length: decayed counts of drafted positions kept, and verified (the first rejected counts).
    accepted: dict[int, float] = field(default_factory=dict)
    trials: dict[int, float] = field(default_factory=dict)
    last_match: int = 0  # n-gram length behind the draft now being verified

    def acceptance(self, match: int) -> float:
        kept = self.accepted.get(match, PRIOR_ACCEPTANCE * PRIOR_TRIALS)
        return min(kept / self.trials.get(match, PRIOR_TRIALS), MAX_ACCEPTANCE)

    def learn(self, match: int, drafted: int, accepted: int) -> None:
        decay = DECAY ** max(1, drafted)
        self.accepted[match] = self.accepted.get(match, PRIOR_ACCEPTANCE * PRIOR_TRIALS) * decay + accepted
        self.trials[match] = (self.trials.get(match, PRIOR_TRIALS) * decay + accepted
                              + (1 if accepted < drafted else 0))

    def fade(self, match: int) -> None:
        if match in self.trials:
            self.accepted[match] = (self.accepted[match] * IDLE_DECAY
                                    + PRIOR_ACCEPTANCE * PRIOR_TRIALS * (1 - IDLE_DECAY))
            self.trials[match] = self.trials[match] * IDLE_DECAY + PRIOR_TRIALS * (1 - IDLE_DECAY)


@dataclass
class SpeculationStats:
    drafts: int = 0  # verifications that carried at least one draft token
    draft_tokens: int = 0
    accepted_tokens: int = 0


@dataclass
class Speculator:
    """Proposes drafts for decoding requests and learns each one's acceptance. Engine thread only."""

    config: SpeculationConfig
    stats: SpeculationStats = field(default_factory=SpeculationStats)
    _states: dict[str, _RequestState] = field(default_factory=dict)

    def can_draft(self, request: Request) -> bool:
        return (self.config.enabled and request.params.speculative and request.state is RequestState.DECODING
                and not request.is_replaying and request.max_tokens - len(request.output_ids) > 1)

    def propose(self, decoding: list[Request], batch_tokens: int, budget: int) -> dict[str, list[int]]:
        """N-gram drafts worth verifying in a step that already carries `batch_tokens` tokens, at most `budget`
        in all. `decoding`: the requests that get one decode token in this step."""
        candidates: list[tuple[str, int, float]] = []
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
                candidates.append((request.request_id, len(draft), state.acceptance(match)))
                drafts[request.request_id] = draft
                matches[request.request_id] = (state, match)
        chosen = self.choose_lengths(candidates, batch_tokens, budget)
        for request_id, (state, match) in matches.items():
            if request_id in chosen:
                state.last_match = match
            else:
                state.fade(match)
        return {request_id: drafts[request_id][:length] for request_id, length in chosen.items()}

    def propose_lengths(self, decoding: list[Request], batch_tokens: int, budget: int) -> dict[str, int]:
        """How many tokens the executor's draft model should draft for each request (those worth it only)."""
        candidates = []
        for request in decoding:
            if self.can_draft(request) and (room := self._room(request)) > 0:
                candidates.append((request.request_id, room, self._state(request.request_id).acceptance(0)))
        chosen = self.choose_lengths(candidates, batch_tokens, budget)
        for request_id, _, _ in candidates:
            if request_id not in chosen:
                self._state(request_id).fade(0)
        return chosen

    def choose_lengths(self, candidates: list[tuple[str, int, float]], batch_tokens: int, budget: int
                       ) -> dict[str, int]:
        """Draft lengths for (request id, longest possible draft, per-token acceptance α) candidates: the
        `draft_min` floor first, then token after token, the likeliest kept first, while each pays (see the
        module's docstring). At most `budget` tokens in all."""
        if not candidates or budget <= 0:
            return {}
        fixed, ratio = self.config.step_fixed_cost_tokens, self.config.draft_cost
        chosen: dict[str, int] = {}
        depth_tokens: list[int] = []  # m_j: tokens in the draft model's pass for draft position j (from 0)
        useful, cost = float(batch_tokens), fixed + batch_tokens  # U, D

        def add(i: int, length: int, p: float) -> None:  # the length-th draft token (from 1) of candidate i
            nonlocal useful, cost, budget
            request_id = candidates[i][0]
            chosen[request_id] = length
            if len(depth_tokens) < length:
                depth_tokens.append(0)
                cost += ratio * fixed
            depth_tokens[length - 1] += 1
            useful += p
            cost += 1 + ratio
            budget -= 1

        heap: list[tuple[float, int, int]] = []  # (-p, candidate, draft length), for each candidate's next token
        for i, (_, longest, alpha) in enumerate(candidates):
            length = 0
            while length < min(self.config.draft_min, longest) and budget > 0:
                length += 1
                add(i, length, alpha ** length)
            if length < longest:
                heap.append((-(alpha ** (length + 1)), i, length + 1))
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
            for p, j in group:
                add(j, length, p)
                _, longest, alpha = candidates[j]
                if length < longest:
                    heapq.heappush(heap, (-p * alpha, j, length + 1))
        return chosen

    def record(self, request_id: str, drafted: int, accepted: int) -> None:
        """What verifying a `drafted`-token draft kept."""
        self.stats.drafts += 1
        self.stats.draft_tokens += drafted
        self.stats.accepted_tokens += accepted
        state = self._state(request_id)
        state.learn(state.last_match, drafted, accepted)

    def _room(self, request: Request) -> int:
        """The longest draft: within --draft-max, and every verified token within max_tokens (1 + k tokens can
        come out of a k-token draft)."""
        return min(self.config.draft_max, request.max_tokens - len(request.output_ids) - 1)

    def forget(self, request_id: str) -> None:
        self._states.pop(request_id, None)

    def _state(self, request_id: str) -> _RequestState:
        state = self._states.get(request_id)
        if state is None:
            state = self._states[request_id] = _RequestState(NgramIndex(self.config.ngram_min, self.config.ngram_max))
        return state

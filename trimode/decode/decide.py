"""The decision stage: one batched computation from the logits of a forward's read positions to what the step
machines need (chosen tokens, their confidences, the probabilities of given tokens, log-probabilities), then ONE
transfer to the host.

A machine states what it needs in its `Forward` (`pick=Pick(...)`) and receives a `Decision` (host tensors)
instead of logits. The engine decides for every row of a step at once; the batch-1 driver calls the same
`decide` with one pick, so both drivers give the same tokens. Per position, in this order:

1. blend (quadratic speculation's AR mix): logits[a] = w * logits[a] + (1 - w) * logits[b];
2. logit processors, per row: those the sampling settings switch on (`processors_of`: logit bias, min_tokens,
   the repetition, frequency and presence penalties over the position's history, `History`), then allowed
   tokens (an edit's healed slot), then a grammar's mask last (`Pick.masks`: structured output);
3. the choice, as `sampling.choose`: argmax when greedy, else keyed Gumbel-max over the temperature, top-k and
   top-p filtered logits (noise keyed by seed, row, position, step: the same bits whichever rows share a pass);
4. confidence = softmax(processed logits)[token] (no temperature), the probabilities of `given` tokens, and the
   log-probabilities log_softmax(raw logits) (the model's distribution, as OpenAI reports them).

A position's history is what AR would have seen there: the committed output, plus for a verify pass the draft
tokens before it (`History.ahead`, `Pick.seen`), so speculation stays lossless under penalties.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from itertools import accumulate

import torch

from trimode.decode.sampling import SamplingParams, argmax_last, filter_logits, gumbel_noise


@dataclass
class History:
    """The tokens a position's penalties see: the prompt (repetition penalty), the committed output, and
    `ahead` tokens after it of which each position sees the first `Pick.seen[i]` (a verify pass's drafts)."""

    prompt: Sequence[int]
    output: Sequence[int]
    ahead: Sequence[int] = ()


NO_HISTORY = History((), ())


@dataclass
class Pick:
    """What a machine needs from a pass: a token chosen at each read position (N of them, row-major)."""

    sampling: SamplingParams
    positions: Sequence[int]  # [N] absolute position of each chosen token (the noise key)
    step: int | Sequence[int] = 0  # noise step key, one or per position
    rows: Sequence[int] | None = None  # [N] batch row of each position (noise key, index into histories)
    histories: Sequence[History] | None = None  # per batch row; None: no penalties read any
    seen: Sequence[int] | None = None  # [N] how many `History.ahead` tokens each position sees (None: 0)
    eos: frozenset[int] = frozenset()  # the tokens `min_tokens` holds back
    confidence: bool = False  # the probability of each chosen token
    given: Sequence[int] | None = None  # [N] also the probability of these tokens
    logprobs: int | None = None  # the chosen tokens' log-probabilities and this many alternatives (None: none)
    allowed: dict[int, Sequence[int]] = field(default_factory=dict)  # position -> the only tokens it may take
    blend: tuple[float, Sequence[int], Sequence[int]] | None = None  # (w, a, b): logits[a] = w*[a] + (1-w)*[b]
    masks: torch.Tensor | None = None  # [M, V] bool: the tokens a grammar allows (decode/grammar.py) at ...
    masked_at: Sequence[int] | None = None  # ... these M of the N positions (None: at all N, in order)
    logits: bool = False  # also the raw logits (a rule that reads them: the learned sampler, drafts under a grammar)


@dataclass
class Decision:
    """What a machine receives for its pick: host values over its N read positions."""

    token_ids: list[int]  # [N] the chosen tokens (read once for all picks of the step)
    confidence: torch.Tensor | None = None  # [N] float32
    given: torch.Tensor | None = None  # [N] float32
    logprobs: torch.Tensor | None = None  # [N] float32
    top_ids: torch.Tensor | None = None  # [N, k] int64, most likely first
    top_logprobs: torch.Tensor | None = None  # [N, k] float32
    logits: torch.Tensor | None = None  # [N, V] float32, the model's (blended) logits when the pick asked
    _tokens: torch.Tensor | None = field(default=None, repr=False)

    @property
    def tokens(self) -> torch.Tensor:
        """[N] int64, made on first use: a machine that reads only `token_ids` (AR) costs no tensor op."""
        if self._tokens is None:
            self._tokens = torch.tensor(self.token_ids, dtype=torch.long)
        return self._tokens


# -- logit processors: (logits [n, V] float32 of one pick, the pick) -> logits ------------------------------
class LogitBias:
    def __init__(self, bias: tuple[tuple[int, float], ...]) -> None:
        self.tokens = [t for t, _ in bias]
        self.values = [float(b) for _, b in bias]

    def __call__(self, logits: torch.Tensor, pick: Pick) -> torch.Tensor:
        cols = torch.tensor(self.tokens, dtype=torch.long, device=logits.device)
        values = torch.tensor(self.values, dtype=logits.dtype, device=logits.device)
        return logits.index_add(1, cols, values[None].expand(logits.shape[0], -1))


class AllowedTokens:
    """-inf outside the allowed tokens of the restricted positions (an edit's healed slot; grammar masks)."""

    def __call__(self, logits: torch.Tensor, pick: Pick) -> torch.Tensor:
        keep = torch.ones_like(logits, dtype=torch.bool)
        for i, ok in pick.allowed.items():
            keep[i] = False
            keep[i, torch.as_tensor(ok, dtype=torch.long, device=logits.device)] = True
        return logits.masked_fill(~keep, float("-inf"))


class GrammarMask:
    """-inf at the tokens a grammar does not allow (`Pick.masks`, from each position's GrammarMatcher); last, so
    the grammar has the final word over biases and penalties."""

    def __call__(self, logits: torch.Tensor, pick: Pick) -> torch.Tensor:
        refused = ~pick.masks.to(logits.device, non_blocking=True)
        if pick.masked_at is None:
            return logits.masked_fill(refused, float("-inf"))
        at = torch.as_tensor(pick.masked_at, dtype=torch.long, device=logits.device)
        return logits.index_copy(0, at, logits.index_select(0, at).masked_fill(refused, float("-inf")))


GRAMMAR = GrammarMask()


class MinTokens:
    def __init__(self, min_tokens: int) -> None:
        self.min_tokens = min_tokens

    def __call__(self, logits: torch.Tensor, pick: Pick) -> torch.Tensor:
        made = [len(pick.histories[r].output) + s for r, s in zip(_rows(pick), _seen(pick))]
        early = [m < self.min_tokens for m in made]  # host lists: no device read
        if not pick.eos or not any(early):
            return logits
        block = torch.zeros(logits.shape, dtype=torch.bool)
        rows = torch.tensor(early).nonzero().squeeze(1)
        block[rows[:, None], torch.tensor(sorted(pick.eos), dtype=torch.long)[None, :]] = True
        return logits.masked_fill(block.to(logits.device), float("-inf"))


class Penalties:
    """Repetition (over prompt + history, divide positive logits, multiply negative ones), frequency and
    presence (over the output history: minus f * count, minus p once present)."""

    def __init__(self, repetition: float, frequency: float, presence: float) -> None:
        self.repetition, self.frequency, self.presence = repetition, frequency, presence

    def __call__(self, logits: torch.Tensor, pick: Pick) -> torch.Tensor:
        counts = history_counts(pick, logits.shape[1]).to(logits.device)  # [n, V] output tokens seen
        if self.repetition != 1.0:
            in_prompt = torch.zeros((len(pick.histories), logits.shape[1]), dtype=torch.bool)
            for r, h in enumerate(pick.histories):
                in_prompt[r, torch.tensor(list(h.prompt), dtype=torch.long)] = True
            seen = (counts > 0) | in_prompt[torch.tensor(list(_rows(pick)))].to(logits.device)
            scaled = torch.where(logits > 0, logits / self.repetition, logits * self.repetition)
            logits = torch.where(seen, scaled, logits)
        if self.frequency != 0.0:
            logits = logits - self.frequency * counts
        if self.presence != 0.0:
            logits = logits - self.presence * (counts > 0).float()
        return logits


@lru_cache(maxsize=1024)
def processors_of(sampling: SamplingParams) -> tuple:
    """The processors a request's sampling settings switch on, in the order they apply."""
    out: list = []
    if sampling.logit_bias:
        out.append(LogitBias(sampling.logit_bias))
    if sampling.min_tokens > 0:
        out.append(MinTokens(sampling.min_tokens))
    if sampling.repetition_penalty != 1.0 or sampling.frequency_penalty != 0.0 or sampling.presence_penalty != 0.0:
        out.append(Penalties(sampling.repetition_penalty, sampling.frequency_penalty, sampling.presence_penalty))
    return tuple(out)


def _rows(pick: Pick) -> Sequence[int]:
    return pick.rows if pick.rows is not None else [0] * len(pick.positions)


def _seen(pick: Pick) -> Sequence[int]:
    return pick.seen if pick.seen is not None else [0] * len(pick.positions)


def history_counts(pick: Pick, vocab: int) -> torch.Tensor:
    """[N, V] float32 on the host: how often each token occurs in each position's output history (the output
    and the `ahead` tokens it sees)."""
    rows, seen = _rows(pick), _seen(pick)
    counts = torch.zeros((len(rows), vocab), dtype=torch.float32)
    for r in sorted(set(rows)):
        h = pick.histories[r]
        at = [i for i, x in enumerate(rows) if x == r]
        base = torch.bincount(torch.tensor(list(h.output), dtype=torch.long), minlength=vocab).float()
        if h.ahead:
            ahead = torch.zeros((len(h.ahead) + 1, vocab))
            ahead[torch.arange(1, len(h.ahead) + 1), torch.tensor(list(h.ahead), dtype=torch.long)] = 1.0
            per = base[None] + ahead.cumsum(0)[torch.tensor([seen[i] for i in at])]
        else:
            per = base[None].expand(len(at), -1)
        counts[torch.tensor(at)] = per
    return counts


# -- the batched decision ----------------------------------------------------------------------------------
def decide(logits: Sequence[torch.Tensor], picks: Sequence[Pick]) -> list[Decision]:
    """logits[i]: [N_i, V] at pick i's read positions (any dtype, on the model's device). One transfer to the
    host for all of them; returns each pick's Decision. Batched over the picks: each processor runs once over
    the rows of every pick that switches it on, and greedy rows without processors cost one argmax together."""
    raw = torch.cat(list(logits)) if len(logits) > 1 else logits[0]
    counts = [x.shape[0] for x in logits]
    starts = list(accumulate(counts, initial=0))[:-1]
    raw = _blend(raw, picks, starts)
    proc = _process(raw.float(), raw, picks, starts, counts)
    tokens = _choose(proc, picks, starts, counts)
    fields = []
    want_conf = [i for i, p in enumerate(picks) if p.confidence or p.given is not None]
    if want_conf:
        fields += _probabilities(proc, tokens, picks, starts, counts, want_conf)
    k = max((p.logprobs for p in picks if p.logprobs is not None), default=None)
    if k is not None:
        fields += _logprobs(raw, tokens, k)  # 1 + 2k rows
    if fields:  # the one device-to-host transfer of the step: the tokens and every other field
        host = torch.stack([tokens.double()] + fields).cpu()
        chosen = host[0].long().tolist()
    else:  # the tokens alone (greedy or sampled, nothing else asked): read as they are
        host, chosen = None, tokens.tolist()
    out = _split(host, chosen, picks, counts, bool(want_conf), k)
    for d, p, s, n in zip(out, picks, starts, counts):
        if p.logits:  # a machine that truly needs logits: a second transfer, its own
            d.logits = raw[s : s + n].float().cpu()
    return out


def _process(proc: torch.Tensor, raw: torch.Tensor, picks: Sequence[Pick], starts: list[int],
             counts: list[int]) -> torch.Tensor:
    """The logit processors over every pick's rows. Picks with the same settings (the same processors, the same
    EOS ids) are processed together as one merged pick; the per-pick ones (allowed tokens, grammar masks) after."""
    groups: dict[tuple, list[int]] = {}
    own = []
    for i, p in enumerate(picks):
        if p.sampling.processed:  # a few attribute reads; hashing the settings only for picks that have some
            groups.setdefault((processors_of(p.sampling), p.eos), []).append(i)
        if p.allowed or p.masks is not None:
            own.append(i)
    if not groups and not own:
        return proc
    proc = proc.clone() if proc is raw else proc
    for (shared, _), members in groups.items():
        if len(members) == 1:
            i = members[0]
            merged, rows = picks[i], slice(starts[i], starts[i] + counts[i])
        else:
            merged = _merged([picks[i] for i in members])
            rows = torch.cat([torch.arange(starts[i], starts[i] + counts[i]) for i in members]).to(proc.device)
        part = proc[rows]
        for processor in shared:
            part = processor(part, merged)
        proc[rows] = part
    for i in own:
        p, rows = picks[i], slice(starts[i], starts[i] + counts[i])
        extra = ((AllowedTokens(),) if p.allowed else ()) + ((GRAMMAR,) if p.masks is not None else ())
        part = proc[rows]
        for processor in extra:
            part = processor(part, p)
        proc[rows] = part
    return proc


def _merged(picks: Sequence[Pick]) -> Pick:
    """One pick over the positions of several with the same processor settings (their rows renumbered)."""
    positions, rows, seen, histories = [], [], [], []
    for p in picks:
        base, r = len(histories), _rows(p)
        positions += list(p.positions)
        rows += [base + x for x in r]
        seen += list(_seen(p))
        histories += list(p.histories) if p.histories is not None else [NO_HISTORY] * (max(r, default=0) + 1)
    return Pick(picks[0].sampling, positions, rows=rows, histories=histories, seen=seen, eos=picks[0].eos)


def _blend(raw: torch.Tensor, picks: Sequence[Pick], starts: list[int]) -> torch.Tensor:
    if not any(p.blend for p in picks):
        return raw
    raw = raw.clone()
    for p, s in zip(picks, starts):
        if p.blend is not None:
            w, a, b = p.blend
            a = torch.as_tensor(a, dtype=torch.long, device=raw.device) + s
            b = torch.as_tensor(b, dtype=torch.long, device=raw.device) + s
            raw[a] = w * raw[a] + (1 - w) * raw[b]
    return raw


def _choose(proc: torch.Tensor, picks: Sequence[Pick], starts: list[int], counts: list[int]) -> torch.Tensor:
    """`sampling.choose` for every position at once: sampled positions are grouped by their filter settings
    (the same tensor operations per row as one request alone), their noise drawn in one batch."""
    tokens = argmax_last(proc)
    groups: dict[tuple, list[int]] = {}
    for i, p in enumerate(picks):
        if not p.sampling.greedy:
            key = (p.sampling.temperature, p.sampling.top_p, p.sampling.top_k)
            groups.setdefault(key, []).append(i)
    dev = proc.device
    for members in groups.values():
        params = picks[members[0]].sampling
        index, seeds, positions, steps, rows = [], [], [], [], []
        for i in members:
            p, n = picks[i], counts[i]
            index += range(starts[i], starts[i] + n)
            seeds += [p.sampling.seed] * n
            positions += list(p.positions)
            steps += [p.step] * n if isinstance(p.step, int) else list(p.step)
            rows += list(_rows(p))
        idx = torch.tensor(index, dtype=torch.long, device=dev)
        logits = proc.index_select(0, idx)
        filtered = filter_logits(logits, params).double()
        noise = gumbel_noise(seeds, torch.tensor(positions, dtype=torch.long), steps, proc.shape[-1], dev, rows)
        sampled = argmax_last(filtered + noise)
        # A row whose top logit / temperature overflowed (a temperature near 0) is greedy, the limit it tends to.
        overflowed = ~torch.isfinite(filtered.amax(-1))
        tokens.index_copy_(0, idx, torch.where(overflowed, argmax_last(logits), sampled))
    return tokens


def _probabilities(proc, tokens, picks, starts, counts, which) -> tuple[torch.Tensor, torch.Tensor]:
    """[N] float64: the probability of each chosen token and of each given token (0 where not asked)."""
    n_all = proc.shape[0]
    index, given = [], []
    for i in which:
        index += range(starts[i], starts[i] + counts[i])
        g = picks[i].given
        given += list(g) if g is not None else [0] * counts[i]
    g = torch.tensor(given, dtype=torch.long, device=proc.device)
    if len(index) == n_all:  # every pick asked (diffusion steps): no gather
        probs = proc.softmax(-1)
        return (probs.gather(-1, tokens[:, None]).squeeze(-1).double(),
                probs.gather(-1, g[:, None]).squeeze(-1).double())
    idx = torch.tensor(index, dtype=torch.long, device=proc.device)
    probs = proc.index_select(0, idx).softmax(-1)
    conf = torch.zeros(n_all, dtype=torch.float64, device=proc.device)
    given_p = torch.zeros(n_all, dtype=torch.float64, device=proc.device)
    conf.index_copy_(0, idx, probs.gather(-1, tokens[idx][:, None]).squeeze(-1).double())
    given_p.index_copy_(0, idx, probs.gather(-1, g[:, None]).squeeze(-1).double())
    return conf, given_p


def _logprobs(raw: torch.Tensor, tokens: torch.Tensor, k: int) -> list[torch.Tensor]:
    logp = torch.log_softmax(raw.float(), dim=-1)
    out = [logp.gather(-1, tokens[:, None]).squeeze(-1).double()]
    if k > 0:
        top = torch.topk(logp, k, dim=-1)
        out += list(top.indices.double().T) + list(top.values.double().T)
    return out


def _split(host: torch.Tensor | None, chosen: list[int], picks: Sequence[Pick], counts: list[int], probs: bool,
           k: int | None) -> list[Decision]:
    """Each pick's share of the step's host tensor (rows: tokens, [confidence, given], [logprob, top ids, top
    values]), as views made by one split per field."""
    starts = list(accumulate(counts, initial=0))
    conf = given = logprob = ids = values = None
    at = 1
    if probs:
        conf, given = host[1].float().split(counts), host[2].float().split(counts)
        at = 3
    if k is not None:
        logprob = host[at].float().split(counts)
        if k > 0:
            ids = host[at + 1 : at + 1 + k].T.long().split(counts)
            values = host[at + 1 + k : at + 1 + 2 * k].T.float().split(counts)
    out = []
    for i, pick in enumerate(picks):
        d = Decision(chosen[starts[i] : starts[i + 1]])
        if probs:
            d.confidence = conf[i] if pick.confidence else None
            d.given = given[i] if pick.given is not None else None
        if logprob is not None and pick.logprobs is not None:
            d.logprobs = logprob[i]
            if pick.logprobs > 0:
                d.top_ids, d.top_logprobs = ids[i][:, : pick.logprobs], values[i][:, : pick.logprobs]
        out.append(d)
    return out


def logprobs_of(decision: Decision, at: list[list[int]]) -> list[list[tuple[float, list]]] | None:
    """Per row, the (log-probability, alternatives) of the decision's positions `at[row]` (None: not asked)."""
    if decision.logprobs is None:
        return None
    lp = decision.logprobs.tolist()
    ids = decision.top_ids.tolist() if decision.top_ids is not None else None
    vals = decision.top_logprobs.tolist() if decision.top_logprobs is not None else None
    return [[(lp[i], list(zip(ids[i], vals[i])) if ids is not None else []) for i in row] for row in at]

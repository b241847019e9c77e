"""Block diffusion (spec 2.2): blocks of masks refined in parallel over a causal KV cache of the prefix.

Per block: slot 0 holds the seed (the causal prediction after the prefix) when `causal_context`; each
denoising step runs the block bidirectionally over the read-only cache and commits the masked positions the
schedule picks (threshold: top-1 plus all >= threshold; fixed steps: an even top-k split; or a rule of
decode/unmask.py such as the learned sampler). After the block, one
refresh pass writes its causal K/V and yields the next seed; after the last block it is skipped (the reference
runs it anyway and counts it in nfe; `trimode.compat` adds it back). `max_new_tokens` need not be a multiple of
`block_length`: the last block is cut (the reference requires a multiple). A block with no masked slot (one
slot holding the seed, or a seed and a forced end-think token) needs no denoising step: its tokens are output
as they are.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from trimode.decode.decide import Decision, History, Pick, logprobs_of
from trimode.decode.frontier import Frontier
from trimode.decode.grammar import GrammarMatcher
from trimode.decode.sampling import SamplingParams
from trimode.decode.spec import ModeSpec, check_block, check_bool, check_threshold
from trimode.decode.stats import DecodeStats
from trimode.decode.step import Committed, DecodeOutput, Forward, Machine, Provisional
from trimode.decode.stopping import StopRule, ThinkingBudget
from trimode.decode.transfer import commit_by_threshold, commit_top_k, masked_confidence, transfer_schedule
from trimode.decode.unmask import LEARNED_THRESHOLD, check_unmask, rule_for

REMASKS_PER_SLOT = 2  # with remask_threshold: how often one slot of a block may be remasked


@dataclass(frozen=True)
class Schedule:
    """Which masked slots a denoising step commits (spec 2.2 step 4): with `threshold`, the most confident one
    plus every one at least that confident; without, an even split of the block's masks over `steps` passes.
    With a `rule` (decode/unmask.py: the learned sampler, the oracles of bench/sol.py), the rule decides."""

    threshold: float | None
    steps: int  # the most denoising passes a block may take
    rule: Callable | None = None  # (conf, masked, logits, proposal) -> transfer; commits >= 1 slot per pass

    @classmethod
    def of(cls, block_length: int, threshold: float | None, steps: int | None,
           remask_threshold: float | None, rule: Callable | None = None) -> Schedule:
        if rule is not None:
            if remask_threshold is not None:
                raise ValueError("remask_threshold works with the threshold schedule only")
            return cls(threshold, block_length, rule)  # a rule commits at least one slot per pass
        if remask_threshold is not None and threshold is None:
            raise ValueError("remask_threshold works with the threshold schedule, not with fixed steps")
        # A threshold step commits at least one token, so block_length passes always finish a block (each remask
        # of a slot can cost one more).
        most = block_length if threshold is not None or steps is None else steps
        if remask_threshold is not None:
            most = block_length * (1 + REMASKS_PER_SLOT)
        if most < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        return cls(threshold, most)

    def plan(self, masked: torch.Tensor) -> torch.Tensor | None:
        """Per row, how many slots each step commits (the fixed-step schedule; None with a threshold)."""
        if self.rule is not None or self.threshold is not None:
            return None
        return transfer_schedule(masked.sum(-1), self.steps)

    def transfer(self, conf: torch.Tensor, masked: torch.Tensor, plan: torch.Tensor, step: int,
                 logits: torch.Tensor, proposal: torch.Tensor) -> torch.Tensor:
        if self.rule is not None:
            return self.rule(conf, masked, logits, proposal)
        if self.threshold is None:
            return commit_top_k(conf, masked, plan[:, step])
        return commit_by_threshold(conf, masked, self.threshold)


class Remasking:
    """After each step, mask again a token committed earlier in the block whose probability under the step's
    logits fell below `threshold`, at most REMASKS_PER_SLOT times per slot; the seed and a forced end-think
    token (`fixed`) never."""

    def __init__(self, threshold: float, mask_id: int, fixed: torch.Tensor) -> None:
        self.threshold, self.mask_id, self.fixed = threshold, mask_id, fixed
        self.remasks = torch.zeros(fixed.shape, dtype=torch.long, device=fixed.device)

    def __call__(self, given: torch.Tensor, block, masked, transfer, committed_at) -> None:
        """`given`: the probability of each slot's token before the step (a slot it committed is never doubted)."""
        doubtful = ~masked & ~self.fixed & ~transfer & (self.remasks < REMASKS_PER_SLOT)
        doubtful &= given < self.threshold
        block[doubtful] = self.mask_id
        masked |= doubtful
        self.remasks += doubtful.long()
        committed_at[doubtful] = -1


def diffusion(prompt_ids: torch.Tensor, stop: StopRule, sampling: SamplingParams, mask_id: int,
              block_length: int = 32, threshold: float | None = 0.9, causal_context: bool = True,
              steps: int | None = None, thinking: ThinkingBudget | None = None,
              provisional: bool = False, remask_threshold: float | None = None, rule: Callable | None = None,
              grammar: list[GrammarMatcher] | GrammarMatcher | None = None) -> Machine:
    """`threshold=None` selects the fixed-step schedule: `steps` denoising passes per block (default
    `block_length`, as the reference), the block's masks split evenly over them. `rule`: an unmasking rule
    (decode/unmask.py) instead of either.

    `remask_threshold`: see `Remasking`. The block's tokens are then final only when the block is: none is
    streamed before. `grammar` (one matcher per row, or one): commits follow the left frontier
    (decode/frontier.py); the seeds are chosen under it."""
    schedule = Schedule.of(block_length, threshold, steps, remask_threshold, rule)
    grammars = [grammar] if isinstance(grammar, GrammarMatcher) else grammar
    if grammars is not None and remask_threshold is not None:
        raise ValueError("remask_threshold cannot be used with structured output (a grammar reads final tokens)")
    frontier = None if grammars is None else Frontier(grammars, block_length)
    dev = prompt_ids.device
    batch, prompt_len = prompt_ids.shape
    stats = DecodeStats("diffusion", prompt_tokens=prompt_len, prefill_passes=1)
    context_mask = "causal" if causal_context else "bidirectional"
    generated: list[list[int]] = [[] for _ in range(batch)]
    streamed = [0] * batch

    prompts = prompt_ids.tolist()
    lp_generated: list[list] = [[] for _ in range(batch)]  # each generated token's log-probability, when asked

    def seed_pick(position: int) -> Pick:  # the causal choice after the cache, per row
        hist = [History(prompts[r], generated[r]) for r in range(batch)] if sampling.penalized else None
        masks = None if grammars is None else torch.stack([g.allowed() for g in grammars])
        return Pick(sampling, [position] * batch, rows=list(range(batch)), histories=hist, eos=stop.eos_token_ids,
                    logprobs=sampling.logprobs, masks=masks)

    # 2. Prefill the prompt into the cache; its last logit gives the seed.
    decision = yield Forward(prompt_ids, mask=context_mask, cache="append", logits="last", pick=seed_pick(prompt_len))
    stats.forward_passes += 1
    seed = decision.tokens

    for b in range(math.ceil(stop.max_new_tokens / block_length)):
        start = prompt_len + b * block_length
        positions = torch.arange(start, start + block_length, device=dev)
        # 3. A block of masks: the seed in slot 0, the end-think token where the thinking budget forces it.
        block, masked = new_block(batch, block_length, mask_id, seed if causal_context else None, thinking,
                                  b * block_length, generated, dev)
        remasking = None if remask_threshold is None else Remasking(remask_threshold, mask_id, ~masked)
        if frontier is not None:
            frontier.new_block()
        lp = logprobs_of(decision, [[r] for r in range(batch)]) if causal_context else None
        slot_lp = [[lp[r][0] if lp is not None else None] + [None] * (block_length - 1) for r in range(batch)]
        # 4. Denoise it; the steps stream what settles.
        committed_at, steps_run = yield from denoise_block(
            block, masked, positions, b * block_length, schedule, Context(sampling, prompts, slot_lp), mask_id,
            remasking, provisional, stop, generated, streamed, stats, lp_generated, frontier)
        if frontier is not None:
            frontier.catch_up(block, masked)  # committed slots past the last frontier commit (a forced end-think)

        before = [len(g) for g in generated]
        if sampling.logprobs is not None:
            _given_logprobs(block, masked, slot_lp)
        for r in range(batch):
            generated[r] += block[r].tolist()
            lp_generated[r] += slot_lp[r]
        finished = [stop.finish(g) for g in generated]
        # A step's commits count only the slots that are output (before EOS and within the budget).
        emitted = [len(out) - n for (out, _), n in zip(finished, before)]
        for s in range(steps_run):
            stats.step_commits.append(sum(int((committed_at[r, : emitted[r]] == s).sum()) for r in range(batch)))
        # What no step streamed: all of a block that had no masked slot, so no step.
        yield from _stream(finished, streamed, stats, lp_generated if sampling.logprobs is not None else None)
        if all(over for _, over in finished):
            break
        # 5. Refresh: the block's causal K/V into the cache; its last logit gives the next seed.
        decision = yield Forward(block, mask=context_mask, positions=positions, cache="append", logits="last",
                                 pick=seed_pick(start + block_length))
        stats.forward_passes += 1
        seed = decision.tokens

    out = [stop.finish(g)[0] for g in generated]
    stats.generated_tokens = sum(len(o) for o in out)
    return DecodeOutput(out, stats)


def new_block(batch: int, block_length: int, mask_id: int, seed: torch.Tensor | None,
              thinking: ThinkingBudget | None, offset: int, generated: list[list[int]], device):
    """[batch, block_length] masks, slot 0 the seed (when given); with a thinking budget that ends inside the
    block, the end-think token at generated index `max_thinking_tokens` of every row that has not emitted it.
    `offset` is the block's first generated index. Returns the block and its undecided slots."""
    block = torch.full((batch, block_length), mask_id, dtype=torch.long, device=device)
    if seed is not None:
        block[:, 0] = seed
    if thinking is not None and offset + block_length > thinking.max_thinking_tokens:
        at = max(0, thinking.max_thinking_tokens - offset)
        for r in range(batch):
            if thinking.end_think_token_id not in generated[r]:
                block[r, at] = thinking.end_think_token_id
    # Undecided slots are tracked explicitly: the seed or a committed token may itself be the mask id.
    masked = block == mask_id
    if seed is not None:
        masked[:, 0] = False
    return block, masked


@dataclass
class Context:
    """What a denoising step's pick needs besides the block: the sampling settings, the prompts (repetition
    penalty) and, per row and slot, the log-probability of the slot's token at the pass that revealed it."""

    sampling: SamplingParams
    prompts: list[list[int]]
    slot_lp: list[list]


def denoise_block(block: torch.Tensor, masked: torch.Tensor, positions: torch.Tensor, offset: int,
                  schedule: Schedule, ctx: Context, mask_id: int, remasking: Remasking | None,
                  provisional: bool, stop: StopRule, generated: list[list[int]], streamed: list[int],
                  stats: DecodeStats, lp_generated: list[list] | None = None, frontier: Frontier | None = None):
    """Spec 2.2 step 4 on `block` and `masked` (in place): bidirectional passes over the read-only cache, each
    committing the slots the schedule picks, until no slot is masked or every row holds a settled EOS. Streams
    each row's settled prefix as it grows. With a `frontier` (a grammar per row), commits follow it (at most
    block_length passes; forced tokens cost none). Returns (the step that committed each slot, -1 for none; steps
    run).

    Logit processors see, per slot, the history committed so far: the output of earlier blocks and the block's
    slots committed by earlier steps (the order inside the block does not matter to them)."""
    batch, block_length = block.shape
    sampling = ctx.sampling
    lp_generated = lp_generated if lp_generated is not None else [[] for _ in range(batch)]
    committed_at = torch.full_like(block, -1)  # the step that committed each slot (for honest step counts)
    plan = schedule.plan(masked)
    steps_run = 0
    for step in range(schedule.steps if frontier is None else max(schedule.steps, block_length)):
        if frontier is not None:
            frontier.force(block, masked)
        if not masked.any():
            break
        pick = _denoise_pick(ctx, block, masked, positions, 1 + offset + step, generated, stop,
                             remasking is not None, schedule.rule is not None, frontier)
        decision = yield Forward(block.clone(), mask="bidirectional", positions=positions, pick=pick)
        stats.forward_passes += 1
        steps_run += 1
        proposal, transfer = commit_step(decision, block, masked, schedule, plan, step, frontier)
        _keep_logprobs(decision, transfer, ctx.slot_lp)
        if ctx.sampling.logprobs is not None:
            _given_logprobs(block, masked, ctx.slot_lp)
        block[transfer] = proposal[transfer]
        committed_at[transfer] = step
        masked &= ~transfer
        if remasking is not None:
            remasking(decision.given.view(batch, block_length), block, masked, transfer, committed_at)
        if provisional:
            forced = None if frontier is None else [row[:] for row in frontier.forced]
            yield Provisional(block.masked_fill(masked, mask_id).tolist(), stats, forced)
        if remasking is not None and masked.any():
            continue  # a committed token may still be remasked: nothing is final before the block is
        settled = [generated[r] + _settled_prefix(block[r], masked[r]) for r in range(batch)]
        lps = None if sampling.logprobs is None else [lp_generated[r] + ctx.slot_lp[r] for r in range(batch)]
        yield from _stream([stop.finish(s) for s in settled], streamed, stats, lps)
        if all(_eos_done(generated[r], block[r], masked[r], stop) for r in range(batch)):
            break
    return committed_at, steps_run


def _denoise_pick(ctx: Context, block: torch.Tensor, masked: torch.Tensor, positions: torch.Tensor, key: int,
                  generated: list[list[int]], stop: StopRule, given: bool, logits: bool,
                  frontier: Frontier | None) -> Pick:
    """A denoising pass's pick: every slot of every row (row-major), its confidence; the probability of each
    slot's current token for remasking; the block's logits for a rule that reads them (the learned sampler);
    each row's frontier slot under its grammar."""
    batch, block_length = block.shape
    sampling = ctx.sampling
    hist = None
    if sampling.penalized:
        hist = [History(ctx.prompts[r], generated[r] + block[r][~masked[r]].tolist()) for r in range(batch)]
    at, masks = frontier.slot_masks() if frontier is not None else (None, None)
    return Pick(sampling, positions.repeat(batch).tolist(), key,
                rows=[r for r in range(batch) for _ in range(block_length)], histories=hist,
                eos=stop.eos_token_ids, confidence=True, logprobs=sampling.logprobs,
                given=block.flatten().tolist() if given else None, logits=logits,
                masks=masks, masked_at=at)


def commit_step(decision: Decision, block: torch.Tensor, masked: torch.Tensor, schedule: Schedule,
                plan: torch.Tensor | None, step: int, frontier: Frontier | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """The commit rule of one denoising step, from the decision stage's per-slot proposals and confidences (and
    the block's logits when the schedule's rule reads them): (the proposals [B, L], the masked slots to commit
    now [B, L]). With a `frontier`, commits follow it: the frontier slot, then the run after it the schedule
    wanted and the grammar allows (past the schedule's steps, every masked slot is wanted)."""
    dev = block.device
    proposal = decision.tokens.view(block.shape).to(dev)
    conf = masked_confidence(decision.confidence.view(block.shape).to(dev), masked)
    logits = None if decision.logits is None else decision.logits.view(*block.shape, -1).to(dev)
    if frontier is None:
        return proposal, schedule.transfer(conf, masked, plan, step, logits, proposal)
    wanted = schedule.transfer(conf, masked, plan, step, logits, proposal) if step < schedule.steps else masked
    return proposal, frontier.commit(proposal, wanted, masked)


def _given_logprobs(block: torch.Tensor, masked: torch.Tensor, slot_lp: list[list]) -> None:
    """A slot no pass revealed (a forced end-think token, a token the grammar forces) holds a token the engine
    wrote, not one the model chose: it reports log-probability 0.0 (it had probability 1 under the rule that
    wrote it), with itself as its only alternative."""
    for r, row in enumerate(slot_lp):
        for s, entry in enumerate(row):
            if entry is None and not masked[r, s]:
                token = int(block[r, s])
                row[s] = (0.0, [(token, 0.0)])


def _keep_logprobs(decision: Decision, transfer: torch.Tensor, slot_lp: list[list]) -> None:
    """Each committed slot keeps its token's log-probability at the pass that revealed it."""
    if decision.logprobs is None:
        return
    width = transfer.shape[1]
    hits = transfer.nonzero().tolist()
    for (r, s), entry in zip(hits, logprobs_of(decision, [[r * width + s for r, s in hits]])[0]):
        slot_lp[r][s] = entry


def _stream(finished: list[tuple[list[int], bool]], streamed: list[int], stats: DecodeStats,
            logprobs: list[list] | None = None):
    """Yield each row's output tokens past those already streamed (nothing when no row has new ones)."""
    new = [out[streamed[r]:] for r, (out, _) in enumerate(finished)]
    if any(new):
        lps = None
        if logprobs is not None:
            lps = [logprobs[r][streamed[r] : streamed[r] + len(t)] for r, t in enumerate(new)]
        for r, tokens in enumerate(new):
            streamed[r] += len(tokens)
        yield Committed(new, stats, lps)


def _eos_done(generated: list[int], block: torch.Tensor, masked: torch.Tensor, stop: StopRule) -> bool:
    """A row is finished once it holds an EOS with no undecided slot before it."""
    if stop.first_eos(generated) is not None:
        return True
    eos = stop.first_eos(block.tolist())
    return eos is not None and not bool(masked[:eos].any())


def _settled_prefix(block: torch.Tensor, masked: torch.Tensor) -> list[int]:
    """The block's tokens before its first undecided slot."""
    undecided = masked.nonzero()
    end = int(undecided[0]) if len(undecided) else block.numel()
    return block[:end].tolist()


@dataclass(frozen=True)
class DiffusionKnobs:
    block_length: int = 0  # 0: the model's block size
    threshold: float | None = 0.9  # None: the fixed-step schedule
    steps: int | None = None  # denoising passes per block with the fixed-step schedule (default block_length)
    causal_context: bool = True
    remask_threshold: float | None = None  # remask a committed token of the block whose confidence falls below
    unmask: str = "threshold"  # the unmasking policy (decode/unmask.py): threshold, steps or learned
    # unmask="learned": the model's sampler, filled in by resolve_knobs from the model (not a knob: no name)
    sampler: object = field(default=None, repr=False, compare=False, metadata={"knob": False})

    @staticmethod
    def settle(values: dict, given: dict) -> None:
        """A step count selects the fixed-step schedule (unmask="steps"); unmask="learned" without a
        threshold uses the sampler's default probability threshold."""
        unmask = values.get("unmask", "threshold")
        if values.get("steps") is not None or unmask == "steps":
            if given.get("threshold") is not None:
                raise ValueError("give either threshold or steps for diffusion, not both")
            if unmask not in ("threshold", "steps"):
                raise ValueError(f"steps is the fixed schedule of unmask='steps', not of unmask={unmask!r}")
            values["threshold"] = None
            values["unmask"] = "steps"
        elif unmask == "learned" and given.get("threshold") is None:
            values["threshold"] = LEARNED_THRESHOLD

    def check(self, defaults) -> None:
        check_block("diffusion", self.block_length, 1)
        check_threshold(self.threshold)
        check_threshold(self.remask_threshold)
        if self.remask_threshold is not None and self.threshold is None:
            raise ValueError("remask_threshold works with the threshold schedule, not with steps")
        check_bool("causal_context", self.causal_context)
        check_unmask(self.unmask, ("threshold", "steps", "learned"), defaults)
        if self.unmask == "learned" and self.remask_threshold is not None:
            raise ValueError("remask_threshold works with unmask='threshold', not with unmask='learned'")
        if self.steps is not None and (isinstance(self.steps, bool) or not isinstance(self.steps, int)
                                       or self.steps < 1):
            raise ValueError(f"steps must be an integer >= 1, got {self.steps!r}")


def _build(ids, stop, sampling, mask_id, k, thinking, provisional, steer, block, grammar=None):
    return diffusion(ids, stop, sampling, mask_id, k.block_length, k.threshold, k.causal_context, k.steps, thinking,
                     provisional, k.remask_threshold, rule_for(k.unmask, k.threshold, k.sampler), grammar)


SPEC = ModeSpec("diffusion", "block diffusion, seed token + post-block cache refresh", DiffusionKnobs, _build,
                lossless=False, kv_scratch=lambda max_new, b: math.ceil(max_new / b) * b, pass_tokens=lambda b: b,
                forwards_per_cycle=lambda steps: steps + 1,  # a block's denoising steps and its refresh
                least_block=1, try_rank=0, batch_rows=True)

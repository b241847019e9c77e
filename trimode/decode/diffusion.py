"""Block diffusion (spec 2.2): blocks of masks refined in parallel over a causal KV cache of the prefix.

Per block: slot 0 holds the seed (the causal prediction after the prefix) when `causal_context`; each
denoising step runs the block bidirectionally over the read-only cache and commits the masked positions the
transfer rule picks (threshold: top-1 plus all >= threshold; fixed steps: an even top-k schedule). After the
block, one refresh pass writes its causal K/V and yields the next seed; after the last block it is skipped
(the reference runs it anyway and counts it in nfe; `trimode.compat` adds it back). `max_new_tokens` need not be
a multiple of `block_length`: the last block is cut (the reference requires a multiple).
"""

from __future__ import annotations

import math

import torch

from trimode.decode.sampling import SamplingParams, choose, confidence
from trimode.decode.stats import DecodeStats
from trimode.decode.step import Committed, DecodeOutput, Forward, Machine, Provisional
from trimode.decode.stopping import StopRule, ThinkingBudget
from trimode.decode.transfer import commit_by_threshold, commit_top_k, masked_confidence, transfer_schedule


def _eos_done(generated: list[int], block: torch.Tensor, masked: torch.Tensor, stop: StopRule) -> bool:
    """A row is finished once it holds an EOS with no undecided slot before it."""
    if stop.first_eos(generated) is not None:
        return True
    eos = stop.first_eos(block.tolist())
    return eos is not None and not bool(masked[:eos].any())


REMASKS_PER_SLOT = 2  # with remask_threshold: how often one slot of a block may be remasked


def diffusion(prompt_ids: torch.Tensor, stop: StopRule, sampling: SamplingParams, mask_id: int,
              block_length: int = 32, threshold: float | None = 0.9, causal_context: bool = True,
              steps: int | None = None, thinking: ThinkingBudget | None = None,
              provisional: bool = False, remask_threshold: float | None = None) -> Machine:
    """`threshold=None` selects the fixed-step schedule: `steps` denoising passes per block (default
    `block_length`, as the reference), the block's masks split evenly over them.

    `remask_threshold`: after each step, a token committed earlier in this block whose probability under the
    step's logits fell below it is masked again (at most REMASKS_PER_SLOT times per slot), so a token committed
    too early can be revisited. The block's tokens are then final only when the block is: none is streamed
    before."""
    if remask_threshold is not None and threshold is None:
        raise ValueError("remask_threshold works with the threshold schedule, not with fixed steps")
    # A threshold step commits at least one token, so block_length passes always finish a block (each remask
    # of a slot can cost one more).
    steps_per_block = block_length if threshold is not None or steps is None else steps
    if remask_threshold is not None:
        steps_per_block = block_length * (1 + REMASKS_PER_SLOT)
    if steps_per_block < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    dev = prompt_ids.device
    batch, prompt_len = prompt_ids.shape
    stats = DecodeStats("diffusion", prompt_tokens=prompt_len, prefill_passes=1)
    num_blocks = math.ceil(stop.max_new_tokens / block_length)
    rows = torch.arange(batch).repeat_interleave(block_length)
    context_mask = "causal" if causal_context else "bidirectional"

    logits = yield Forward(prompt_ids, mask=context_mask, cache="append", logits="last")
    stats.forward_passes += 1
    seed = choose(logits, torch.full((batch,), prompt_len), sampling, rows=torch.arange(batch))

    generated: list[list[int]] = [[] for _ in range(batch)]
    streamed = [0] * batch
    for b in range(num_blocks):
        start = prompt_len + b * block_length
        block = torch.full((batch, block_length), mask_id, dtype=torch.long, device=dev)
        if causal_context:
            block[:, 0] = seed
        if thinking is not None and (b + 1) * block_length > thinking.max_thinking_tokens:
            offset = max(0, thinking.max_thinking_tokens - b * block_length)
            for r in range(batch):
                if thinking.end_think_token_id not in generated[r]:
                    block[r, offset] = thinking.end_think_token_id
        # Undecided slots are tracked explicitly: the seed or a committed token may itself be the mask id.
        masked = block == mask_id
        if causal_context:
            masked[:, 0] = False
        committed_at = torch.full_like(block, -1)  # the step that committed each slot (for honest step counts)
        remasks = torch.zeros_like(block)
        fixed = ~masked  # the seed and a forced end-think token are never remasked
        schedule = transfer_schedule(masked.sum(-1), steps_per_block)
        positions = torch.arange(start, start + block_length, device=dev)
        steps_run = 0

        for step in range(steps_per_block):
            if not masked.any():
                break
            logits = yield Forward(block.clone(), mask="bidirectional", positions=positions)
            stats.forward_passes += 1
            steps_run += 1
            proposal = choose(logits.flatten(0, 1), positions.repeat(batch), sampling,
                              step=1 + b * block_length + step, rows=rows)
            proposal = proposal.view(batch, block_length)
            conf = masked_confidence(confidence(logits, proposal), masked)
            if threshold is None:
                transfer = commit_top_k(conf, masked, schedule[:, step])
            else:
                transfer = commit_by_threshold(conf, masked, threshold)
            block[transfer] = proposal[transfer]
            committed_at[transfer] = step
            masked &= ~transfer
            if remask_threshold is not None:
                doubtful = ~masked & ~fixed & ~transfer & (remasks < REMASKS_PER_SLOT)
                doubtful &= confidence(logits, block) < remask_threshold
                block[doubtful] = mask_id
                masked |= doubtful
                remasks += doubtful.long()
                committed_at[doubtful] = -1
            if provisional:
                yield Provisional(block.masked_fill(masked, mask_id).tolist(), stats)
            if remask_threshold is not None and masked.any():
                continue  # a committed token may still be remasked: nothing is final before the block is
            settled = [generated[r] + _settled_prefix(block[r], masked[r]) for r in range(batch)]
            new = [stop.finish(settled[r])[0][streamed[r] :] for r in range(batch)]
            if any(new):
                for r in range(batch):
                    streamed[r] += len(new[r])
                yield Committed(new, stats)
            if all(_eos_done(generated[r], block[r], masked[r], stop) for r in range(batch)):
                break

        before = [len(g) for g in generated]
        for r in range(batch):
            generated[r] += block[r].tolist()
        finished = [stop.finish(g) for g in generated]
        # A step's commits count only the slots that are output (before EOS and within the budget).
        emitted = [len(out) - n for (out, _), n in zip(finished, before)]
        for s in range(steps_run):
            stats.step_commits.append(sum(int((committed_at[r, : emitted[r]] == s).sum()) for r in range(batch)))
        if all(over for _, over in finished):
            break
        logits = yield Forward(block, mask=context_mask, positions=positions, cache="append", logits="last")
        stats.forward_passes += 1
        seed = choose(logits, torch.full((batch,), start + block_length), sampling, rows=torch.arange(batch))

    out = [stop.finish(g)[0] for g in generated]
    stats.generated_tokens = sum(len(o) for o in out)
    return DecodeOutput(out, stats)


def _settled_prefix(block: torch.Tensor, masked: torch.Tensor) -> list[int]:
    """The block's tokens before its first undecided slot."""
    undecided = masked.nonzero()
    end = int(undecided[0]) if len(undecided) else block.numel()
    return block[:end].tolist()

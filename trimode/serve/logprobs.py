"""Per-token log-probabilities of a finished generation, for the OpenAI `logprobs` fields.

The decoders do not report logprobs, so they are recomputed with one causal forward pass over prompt + output
(no cache). That pass yields exactly the AR distribution at every position, which is the distribution the
emitted tokens were chosen from in `ar` and the distribution every token was verified against in
`linear_spec` and `quadratic_spec` (without logit mixing), and so in the engine's `auto`, which switches
between those three. Diffusion commits tokens from bidirectional logits
of a partly masked block, which this pass does not reproduce, so the server refuses logprobs there.
Values are log-softmax of the raw logits (before temperature / top-p / top-k), as OpenAI reports them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from trimode.api import TriMode
from trimode.decode.modes import names

# The modes whose tokens are AR's choices (the registry's lossless modes; auto emits exactly the AR output).
LOGPROB_MODES = frozenset(names(lossless=True))


@dataclass
class TokenLogprob:
    token_id: int
    token: str
    logprob: float
    top: list[tuple[int, str, float]]  # (id, text, logprob), most likely first
    text_offset: int  # where the token's text starts in the completion text


@torch.no_grad()
def token_logprobs(tm: TriMode, prompt_ids: list[int], output_ids: list[int], text: str,
                   top: int) -> list[TokenLogprob]:
    """Logprobs of the output tokens whose text is part of `text` (a stop string may cut the tail)."""
    if not output_ids:
        return []
    ids = torch.tensor([prompt_ids + output_ids[:-1]], dtype=torch.long, device=tm.net.device)
    logits = tm.net(ids, mask="causal")[0, len(prompt_ids) - 1 :].float()
    logp = torch.log_softmax(logits, dim=-1)
    chosen = logp.gather(-1, torch.tensor(output_ids, device=logp.device)[:, None]).squeeze(-1).tolist()
    tops = torch.topk(logp, top, dim=-1) if top > 0 else None

    out: list[TokenLogprob] = []
    for i, tid in enumerate(output_ids):
        offset = len(tm.decode(output_ids[:i]) or "")
        if offset >= len(text):
            break  # the rest is cut by a stop string, or is the end-of-sequence token
        alternatives = []
        if tops is not None:
            alternatives = [(int(t), token_text(tm, int(t)), float(v))
                            for v, t in zip(tops.values[i].tolist(), tops.indices[i].tolist(), strict=True)]
        out.append(TokenLogprob(tid, token_text(tm, tid), float(chosen[i]), alternatives, offset))
    return out


def token_text(tm: TriMode, token_id: int) -> str:
    if tm.tokenizer is None:
        return str(token_id)
    return tm.tokenizer.decode([token_id], skip_special_tokens=False)


def completion_logprobs(entries: list[TokenLogprob], top: int) -> dict:
    """The /v1/completions `logprobs` object."""
    return {
        "tokens": [e.token for e in entries],
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": [{text: lp for _, text, lp in e.top} for e in entries] if top > 0 else None,
        "text_offset": [e.text_offset for e in entries],
    }


def chat_logprobs(entries: list[TokenLogprob]) -> dict:
    """The /v1/chat/completions `logprobs` object."""

    def item(text: str, lp: float) -> dict:
        return {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8", "surrogatepass"))}

    return {
        "content": [{**item(e.token, e.logprob), "top_logprobs": [item(t, lp) for _, t, lp in e.top]} for e in entries],
        "refusal": None,
    }

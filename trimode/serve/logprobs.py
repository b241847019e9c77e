"""Per-token log-probabilities of a finished generation, for the OpenAI `logprobs` fields.

The decoders do not report logprobs, so they are recomputed with one causal forward pass over prompt + output
(no cache). That pass yields exactly the AR distribution at every position, which is the distribution the
emitted tokens were chosen from in `ar` and the distribution every token was verified against in
`linear_spec` and `quadratic_spec` (without logit mixing), and so in the engine's `auto`, which switches
between those three. Diffusion commits tokens from bidirectional logits
of a partly masked block, which this pass does not reproduce, so the server refuses logprobs there.
Values are log-softmax of the raw logits (before temperature / top-p / top-k), as OpenAI reports them.

The prompt's logprobs (`echo` with `logprobs`, vLLM's `prompt_logprobs`) come from the engine, which reads them
off the request's own prefill (`trimode.engine.scoring`): no extra pass.
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
    logprob: float | None  # None: the first prompt token (nothing before it to predict it from)
    top: list[tuple[int, str, float]] | None  # (id, text, logprob), most likely first
    text_offset: int  # where the token's text starts in the completion text (the echoed prompt's, with echo)


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
    eos = tm.eos_ids()
    for i, tid in enumerate(output_ids):
        offset = len(tm.decode(output_ids[:i]) or "")
        if offset >= len(text) and tid not in eos:
            break  # the rest is cut by a stop string (the end-of-sequence token has an entry: it was generated)
        alternatives = []
        if tops is not None:
            alternatives = [(int(t), token_text(tm, int(t)), float(v))
                            for v, t in zip(tops.values[i].tolist(), tops.indices[i].tolist(), strict=True)]
        out.append(TokenLogprob(tid, token_text(tm, tid), float(chosen[i]), alternatives, offset))
    return out


def prompt_logprobs(tm: TriMode, prompt_ids: list[int], scores: list, top: int) -> list[TokenLogprob]:
    """The prompt's entries from the engine's scores (`GenerationResult.prompt_logprobs`), offsets over the
    prompt's text; the first has no logprob and no alternatives, as OpenAI's and vLLM's echo."""
    texts = tm.tokenizer.tok.decode_batch([prompt_ids[:i] for i in range(len(prompt_ids))]) if tm.tokenizer else None
    out = []
    for i, (tid, score) in enumerate(zip(prompt_ids, scores, strict=True)):
        offset = len(texts[i]) if texts is not None else 0
        if score is None:
            out.append(TokenLogprob(tid, token_text(tm, tid), None, None, offset))
        else:
            alternatives = [(t, token_text(tm, t), lp) for t, lp in score.top[:top]]
            out.append(TokenLogprob(tid, token_text(tm, tid), score.logprob, alternatives, offset))
    return out


def shifted(entries: list[TokenLogprob], by: int) -> list[TokenLogprob]:
    """`entries` with their text offsets moved `by` characters (the generated text after an echoed prompt)."""
    return [TokenLogprob(e.token_id, e.token, e.logprob, e.top, e.text_offset + by) for e in entries]


def vllm_prompt_logprobs(tm: TriMode, prompt_ids: list[int], scores: list) -> list[dict | None]:
    """vLLM's `prompt_logprobs`: per prompt token None (the first) or {token id: {logprob, rank, decoded_token}}
    for the prompt's token and the most likely ones."""
    out: list[dict | None] = []
    for score in scores:
        if score is None:
            out.append(None)
            continue
        entry = {str(t): {"logprob": lp, "rank": r + 1, "decoded_token": token_text(tm, t)}
                 for r, (t, lp) in enumerate(score.top)}
        entry.setdefault(str(score.token_id), {"logprob": score.logprob, "rank": score.rank,
                                               "decoded_token": token_text(tm, score.token_id)})
        out.append(entry)
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
        "top_logprobs": [None if e.top is None else {text: lp for _, text, lp in e.top} for e in entries]
        if top > 0 else None,
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

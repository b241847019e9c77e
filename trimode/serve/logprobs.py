"""Per-token log-probabilities for the OpenAI `logprobs` fields, from the engine's own numbers.

The generated tokens' logprobs come from the engine's decision stage (`EngineRequest.logprobs`, carried on
`GenerationResult.logprobs`): the distribution each token was chosen from, read off the pass that chose it (AR's
in `ar`, the verifying pass's in `linear_spec`, `quadratic_spec` and `auto`, equal to AR's; the pass that revealed
it in `diffusion`). The prompt's (`echo` with `logprobs`, vLLM's `prompt_logprobs`) come from the request's own
prefill (`trimode.engine.scoring`). No extra model call. Values are log-softmax of the logits before temperature /
top-p / top-k, as OpenAI reports them.
"""

from __future__ import annotations

from dataclasses import dataclass

from trimode.api import TriMode
from trimode.decode.result import GenerationResult


@dataclass
class TokenLogprob:
    token_id: int
    token: str
    logprob: float | None  # None: the first prompt token (nothing before it to predict it from)
    top: list[tuple[int, str, float]] | None  # (id, text, logprob), most likely first
    text_offset: int  # where the token's text starts in the completion text (the echoed prompt's, with echo)


def token_logprobs(tm: TriMode, result: GenerationResult, text: str, top: int) -> list[TokenLogprob]:
    """The output tokens' entries whose text is part of `text` (a stop string may cut the tail), from the
    engine's logprobs of `result` (asked for with `EngineRequest.logprobs`)."""
    if not result.token_ids:
        return []
    if result.logprobs is None or len(result.logprobs) < len(result.token_ids):
        raise RuntimeError("the engine reported no logprobs for a request that asked for them")
    out: list[TokenLogprob] = []
    eos = tm.eos_ids()
    for i, (tid, (logprob, alternatives)) in enumerate(zip(result.token_ids, result.logprobs, strict=False)):
        offset = len(tm.decode(result.token_ids[:i]) or "")
        if offset >= len(text) and tid not in eos:
            break  # the rest is cut by a stop string (the end-of-sequence token has an entry: it was generated)
        shown = [(int(t), token_text(tm, int(t)), float(v)) for t, v in list(alternatives)[:top]]
        out.append(TokenLogprob(tid, token_text(tm, tid), float(logprob), shown, offset))
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

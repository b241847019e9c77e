"""What a generation hands its caller: streaming events (`Delta`, `BlockState`) and the `GenerationResult`.

Both drivers (batch 1 in the API facade `TriMode`, many requests in `trimode.engine`) produce these same types.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from trimode.decode.stats import DecodeStats


@dataclass
class GenerationResult:
    token_ids: list[int]
    text: str | None
    stats: DecodeStats
    finish_reason: str  # "stop" (EOS or a stop string), "length" or "cancelled"
    mode: str = "ar"
    knobs: dict = field(default_factory=dict)
    spans: list[tuple[int, int]] = field(default_factory=list)  # edits: the character ranges of `text` written
    # The engine's prompt scores when asked for (`EngineRequest.prompt_logprobs`): one entry per prompt token, the
    # first None (`trimode.engine.scoring.PromptLogprob`).
    prompt_logprobs: list | None = None
    # With logprobs asked for: per token, (log-probability, [(alternative id, log-probability), ...]) from the
    # pass that chose it (AR's distribution in the lossless modes; the revealing pass in diffusion).
    logprobs: list[tuple[float, list[tuple[int, float]]]] | None = None


@dataclass
class Delta:
    """Newly committed tokens and their text (None while its reader has not decoded it: the engine leaves the
    decoding of a stream without stop strings to the thread that reads it)."""

    token_ids: list[int]
    text: str
    forward_passes: int | None = None  # the request's forward passes so far (live figures for a stream)
    logprobs: list[tuple[float, list[tuple[int, float]]]] | None = None  # per token, as GenerationResult's
    # A deferred stream's delta (`text` None until its reader decodes it: trimode.decode.text.DeferredText):
    # whether it is the stream's last, so an incomplete character at the end is shown as it is.
    final: bool = False


@dataclass
class BlockState:
    """A provisional view of the diffusion block being denoised (mask slots shown as None). `forced`: per slot,
    whether the request's grammar forced its token (no forward pass wrote it); None without a grammar."""

    token_ids: list[int | None]
    text: str
    forward_passes: int | None = None
    forced: list[bool] | None = None

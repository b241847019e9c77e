"""The `trimode` command line. Every sub-command has --help; errors are one line, never a traceback."""

from __future__ import annotations

import sys
from enum import Enum

import typer

app = typer.Typer(
    help="trimode: run, serve, train and benchmark tri-mode (AR / diffusion / self-speculative) NLD models.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.callback()
def _root() -> None:
    """trimode: run, serve, train and benchmark tri-mode (AR / diffusion / self-speculative) NLD models."""


def _modes() -> type[Enum]:
    """The modes `generate` runs, from the registry (auto steers by load: it runs in the engine only)."""
    from trimode.decode.modes import MODES

    return Enum("Mode", {name: name for name, spec in MODES.items() if not spec.engine_only}, type=str)


Mode = _modes()


def fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code=2)


def load_or_fail(model: str | None, dtype: str | None = None, device: str | None = None, lora: bool = True):
    import trimode

    try:
        return trimode.load(model, dtype=dtype, device=device, lora=lora)
    except (ValueError, OSError, RuntimeError) as e:
        fail(str(e))


def _parse_bias(text: str | None) -> dict[int, float] | None:
    """"id:bias,id:bias" as a dict (fails with a message naming --logit-bias)."""
    if not text:
        return None
    try:
        return {int(k): float(v) for k, v in (item.split(":") for item in text.split(",") if item.strip())}
    except ValueError:
        fail(f'--logit-bias takes "token_id:bias" pairs separated by commas, got {text!r}')


@app.command()
def generate(
    prompt: str = typer.Argument(..., help="Prompt text."),
    model: str | None = typer.Option(None, "--model", "-m", help="Checkpoint directory or Hub repo id (default: the bundled model)."),
    mode: Mode = typer.Option("ar", "--mode", help="Decoding mode."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", "-n", help="Most tokens to generate."),
    temperature: float = typer.Option(0.0, help="0 = greedy."),
    top_p: float = typer.Option(1.0, "--top-p"),
    top_k: int = typer.Option(0, "--top-k"),
    seed: int | None = typer.Option(None, help="Seed for sampling (reproducible output)."),
    block_length: int | None = typer.Option(None, "--block-length", help="Block size for diffusion / speculation (default: the model's)."),
    threshold: float | None = typer.Option(None, help="Commit threshold (diffusion default 0.9; linear_spec draft default 0)."),
    steps: int | None = typer.Option(None, "--steps", help="Diffusion: fixed-step schedule with this many passes per block instead of a threshold."),
    unmask: str | None = typer.Option(None, "--unmask", help="Diffusion / linear_spec draft: unmasking policy threshold | steps | learned (learned: the model's sampler/, --threshold is then its probability threshold, default 0.5)."),
    no_causal_context: bool = typer.Option(False, "--no-causal-context", help="Diffusion: bidirectional prefix, no seed token."),
    drafter: bool | None = typer.Option(None, "--drafter/--no-drafter", help="linear_spec: use the LoRA drafter (default: when present)."),
    ar_mix_weight: float | None = typer.Option(None, "--ar-mix-weight", help="quadratic_spec: AR/diffusion logit mix."),
    max_thinking_tokens: int | None = typer.Option(None, "--max-thinking-tokens", help="Force the end-of-thinking token after this many tokens if it has not appeared."),
    end_think_token_id: int | None = typer.Option(None, "--end-think-token-id", help="The end-of-thinking token (default: the vocabulary's </think>)."),
    repetition_penalty: float = typer.Option(1.0, "--repetition-penalty", help="> 0; above 1 discourages tokens of the prompt and output (divides positive logits, multiplies negative ones)."),
    frequency_penalty: float = typer.Option(0.0, "--frequency-penalty", help="[-2, 2]: minus this times a token's count in the output."),
    presence_penalty: float = typer.Option(0.0, "--presence-penalty", help="[-2, 2]: minus this once a token is in the output."),
    logit_bias: str | None = typer.Option(None, "--logit-bias", help='Token biases in [-100, 100], e.g. "50:-100,51:5".'),
    min_tokens: int = typer.Option(0, "--min-tokens", help="No end-of-sequence before this many new tokens."),
    chat: bool = typer.Option(False, help="Wrap the prompt in the model's chat template as a user message."),
    dtype: str | None = typer.Option(None, help="float32 / bfloat16 (default: float32 on CPU, bfloat16 on CUDA)."),
    device: str | None = typer.Option(None, help="cpu / cuda (default: cuda when available)."),
) -> None:
    """Generate text in one of the four modes and print a one-line summary."""
    bias = _parse_bias(logit_bias)
    tm = load_or_fail(model, dtype, device)
    text: str | list[int] = prompt
    if tm.tokenizer is None:
        try:  # a checkpoint without tokenizer.json takes token ids: "12 7 99"
            text = [int(t) for t in prompt.split()]
        except ValueError:
            fail("this checkpoint has no tokenizer.json; give the prompt as space-separated token ids")
    if chat:
        if tm.tokenizer is None:
            fail("this model has no tokenizer / chat template")
        text = tm.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
    # Every knob goes to the API; a mode ignores the knobs of the others.
    knobs = {"block_length": block_length, "threshold": threshold, "steps": steps, "use_drafter": drafter,
             "causal_context": False if no_causal_context else None, "ar_mix_weight": ar_mix_weight,
             "unmask": unmask}
    try:
        gen = tm.stream(text, mode=mode.value, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                        top_k=top_k, seed=seed, max_thinking_tokens=max_thinking_tokens,
                        end_think_token_id=end_think_token_id, repetition_penalty=repetition_penalty,
                        frequency_penalty=frequency_penalty, presence_penalty=presence_penalty, logit_bias=bias,
                        min_tokens=min_tokens, **knobs)
        if tm.tokenizer is not None and not chat:
            typer.echo(prompt, nl=False)
        while True:
            try:
                ev = next(gen)
            except StopIteration as done:
                result = done.value
                break
            if tm.tokenizer is not None:
                sys.stdout.write(ev.text)
                sys.stdout.flush()
    except ValueError as e:
        fail(str(e))
    if tm.tokenizer is None:
        typer.echo(" ".join(map(str, result.token_ids)), nl=False)  # generated ids only
    s = result.stats
    typer.echo("")
    typer.echo(
        f"[{s.mode}] {s.generated_tokens} tokens, {s.forward_passes} forward passes, "
        f"{s.tokens_per_forward:.2f} tokens/forward, {s.tokens_per_second:.1f} tok/s",
        err=True,
    )


def _chat_prefix(tm, chat: str | None) -> str:
    """The chat template around a user message, up to where the assistant's answer starts ("" without chat)."""
    if chat is None:
        return ""
    if tm.tokenizer is None:
        fail("this model has no tokenizer / chat template")
    return tm.tokenizer.apply_chat_template([{"role": "user", "content": chat}])


def _print_edit(result, what: str) -> None:
    typer.echo(result.text)
    s = result.stats
    spans = ", ".join(f"[{a}, {b}]" for a, b in result.spans) or "none"
    typer.echo(f"[{what}] {len(result.token_ids)} tokens, {s.forward_passes} forward passes; changed: {spans}",
               err=True)


@app.command()
def infill(
    prefix: str = typer.Argument(..., help="Text before the hole."),
    suffix: str = typer.Argument(..., help="Text after the hole."),
    model: str | None = typer.Option(None, "--model", "-m", help="Checkpoint directory or Hub repo id (default: the bundled model)."),
    max_new_tokens: int = typer.Option(16, "--max-new-tokens", "-n", help="The hole's budget; the model may write less."),
    threshold: float | None = typer.Option(None, help="Commit threshold of each denoising pass (default 0.9)."),
    hole_window: int | None = typer.Option(None, "--hole-window", help="The hole starts this many slots long and doubles while the model fills it to the end (default 6; 0: the whole budget at once)."),
    chat: str | None = typer.Option(None, help="A user message: the hole is in the assistant's answer to it (chat template)."),
    temperature: float = typer.Option(0.0, help="0 = greedy."),
    seed: int | None = typer.Option(None, help="Seed for sampling."),
    dtype: str | None = typer.Option(None, help="float32 / bfloat16."),
    device: str | None = typer.Option(None, help="cpu / cuda."),
) -> None:
    """Fill in the middle between PREFIX and SUFFIX; prints the middle only."""
    tm = load_or_fail(model, dtype, device)
    try:
        r = tm.infill(_chat_prefix(tm, chat) + prefix, suffix, max_new_tokens=max_new_tokens, threshold=threshold,
                      hole_window=hole_window, temperature=temperature, seed=seed)
    except ValueError as e:
        fail(str(e))
    _print_edit(r, "infill")


@app.command()
def revise(
    draft: str = typer.Argument(..., help="The text to revise."),
    prompt: str = typer.Option("", help="Text before the draft (context)."),
    chat: str | None = typer.Option(None, help="A user message the draft answers (chat template)."),
    span: list[str] = typer.Option([], "--span", help="START:END character range of the draft to rewrite (repeatable); none: the model finds what to rewrite."),
    rounds: int | None = typer.Option(None, help="Most revision rounds without --span (default 4)."),
    revise_threshold: float | None = typer.Option(None, "--revise-threshold", help="Rewrite a token the model predicts otherwise with at least this confidence (default 0.9)."),
    model: str | None = typer.Option(None, "--model", "-m", help="Checkpoint directory or Hub repo id (default: the bundled model)."),
    dtype: str | None = typer.Option(None, help="float32 / bfloat16."),
    device: str | None = typer.Option(None, help="cpu / cuda."),
) -> None:
    """Revise DRAFT: rewrite the given spans, or what the model predicts differently; prints the revised text."""
    spans = None
    if span:
        try:
            spans = [tuple(int(x) for x in s.split(":")) for s in span]
        except ValueError:
            fail("--span takes START:END character offsets, e.g. --span 6:7")
        if any(len(s) != 2 for s in spans):
            fail("--span takes START:END character offsets, e.g. --span 6:7")
    tm = load_or_fail(model, dtype, device)
    try:
        r = tm.revise(_chat_prefix(tm, chat) + prompt, draft, spans=spans, rounds=rounds,
                      revise_threshold=revise_threshold)
    except ValueError as e:
        fail(str(e))
    _print_edit(r, "revise")


def _register_subcommands() -> None:
    """Each layer above the engine adds its own commands (`register(app)`), importing heavy modules lazily."""
    import importlib

    for name in ("trimode.train.cli", "trimode.serve.cli", "trimode.bench.cli", "trimode.bench.serve_cli"):
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:
                raise
            continue
        module.register(app)


_register_subcommands()


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    app()

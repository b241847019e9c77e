"""vLLM's tokenizer endpoints, in the shapes its clients read (lm-evaluation-harness' `remote` tokenizer):

    POST /tokenize        {"prompt": text, "add_special_tokens": bool} or {"messages": [...]}
                          -> {"count", "max_model_len", "tokens", "token_strs"}
    POST /detokenize      {"tokens": [ids]} -> {"prompt": text}
    GET  /tokenizer_info  the tokenizer's settings: eos_token, bos_token, pad_token, chat_template, ...

Bodies are parsed as strictly as the generation routes' and bounded the same way (the body limit; a text longer
than the context can hold is a 400), and the work runs off the event loop.
"""

from __future__ import annotations

from trimode.model.tokenizer import TemplateError
from trimode.serve.plan import Planner
from trimode.serve.protocol import APIError, DetokenizeRequest, TokenizeRequest, parse_body

SETTINGS = ("bos_token", "eos_token", "pad_token", "unk_token", "mask_token", "add_bos_token", "add_eos_token",
            "clean_up_tokenization_spaces")


class Tokens:
    def __init__(self, planner: Planner, model_name: str) -> None:
        self.planner, self.tm, self.model_name = planner, planner.tm, model_name

    def _tokenizer(self):
        if self.tm.tokenizer is None:
            raise APIError(404, "this model has no tokenizer (its prompts are token ids)", code="no_tokenizer")
        return self.tm.tokenizer

    def _model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise APIError(404, f"the model {model!r} does not exist; this server serves {self.model_name!r}",
                           param="model", code="model_not_found")

    def tokenize(self, raw: bytes) -> dict:
        body = parse_body(raw, TokenizeRequest)
        self._model(body.model)
        tok = self._tokenizer()
        if body.messages is not None:
            inputs = [m.as_template_input() for m in body.messages]
            self.planner.check_chars(sum(len(m["content"]) for m in inputs), "messages")
            try:
                ids = tok.encode_chat(inputs, body.add_generation_prompt)
            except TemplateError as e:
                raise APIError(400, str(e), param="messages") from None
        else:
            self.planner.check_chars(len(body.prompt), "prompt")
            ids = tok.tok.encode_batch([body.prompt], add_special_tokens=body.add_special_tokens)[0].ids
        strs = [tok.tok.id_to_token(t) for t in ids] if body.return_token_strs else None
        return {"count": len(ids), "max_model_len": self.tm.max_context, "tokens": ids, "token_strs": strs}

    def detokenize(self, raw: bytes) -> dict:
        body = parse_body(raw, DetokenizeRequest)
        self._model(body.model)
        tok = self._tokenizer()
        vocab = self.tm.config.vocab_size
        bad = next((t for t in body.tokens if not 0 <= t < vocab), None)
        if bad is not None:
            raise APIError(400, f"tokens must be in [0, {vocab}); got {bad}", param="tokens", code="invalid_value")
        return {"prompt": tok.decode(body.tokens, skip_special_tokens=False)}  # as vLLM: a round trip

    def info(self) -> dict:
        tok = self._tokenizer()
        settings = {k: tok.config[k] for k in SETTINGS if k in tok.config}
        return {"tokenizer_class": tok.config.get("tokenizer_class", "PreTrainedTokenizerFast"), **settings,
                "chat_template": tok.chat_template, "model_max_length": self.tm.max_context,
                "vocab_size": tok.vocab_size}

"""Input checks: every prompt a request brings, tokenized and checked against the vocabulary and the
length limit before it is queued; a bad one is a 400 that names the field."""

from __future__ import annotations

from .errors import ApiError


def label_token_ids(tokenizer, labels: list[str]) -> list[int]:
    """The one token of each label; a label that is not exactly one token is an error that says so."""
    out = []
    for label in labels:
        ids = tokenizer.encode(label, add_special_tokens=False)
        if len(ids) != 1:
            hint = ""
            if not label.startswith(" ") and len(tokenizer.encode(" " + label, add_special_tokens=False)) == 1:
                hint = f"; {' ' + label!r} (with a leading space) is one token"
            raise ValueError(f"label {label!r} is {len(ids)} tokens {ids}; each label must be exactly one token{hint}")
        out.append(ids[0])
    return out


class InputChecks:
    """The checks of one server: its tokenizer, vocabulary, length and item limits, served name and labels."""

    def __init__(self, tokenizer, vocab: int, max_model_len: int, max_items: int, model_name: str, labels: list[str]):
        self.tokenizer, self.vocab, self.max_model_len, self.max_items, self.model_name = tokenizer, vocab, max_model_len, max_items, model_name
        self.label_ids = label_token_ids(tokenizer, labels)
        self._texts: dict[int, str] = {}  # token id -> its text (token_text)

    def token_text(self, token: int) -> str:
        """One token's text as OpenAI and vLLM show it (``decode([token])``), cached: an ``echo`` answer
        shows every prompt token (hundreds per request), and the vocabulary is finite."""
        text = self._texts.get(token)
        if text is None:
            text = self._texts[token] = self.tokenizer.decode([token])
        return text

    def token_texts(self, tokens: list[int]) -> list[str]:
        """``token_text`` of each token (an ``echo`` answer's hundreds of thousands: one lookup each)."""
        texts = self._texts
        try:
            return [texts[t] for t in tokens]
        except KeyError:
            return [self.token_text(t) for t in tokens]

    def encode(self, inputs, param: str, truncate: int | None) -> list[list[int]]:
        """Token ids of each input (text or ids), checked against the vocabulary and the length limit."""
        if isinstance(inputs, str) or (inputs and isinstance(inputs[0], int)):
            inputs = [inputs]
        self.check_count(inputs, param)
        return [self.check_ids(self.tokenizer.encode(x) if isinstance(x, str) else x, f"{param}[{i}]", truncate) for i, x in enumerate(inputs)]

    def check_count(self, entries: list, param: str) -> None:
        """A request's inputs / items / documents: at least one, at most ``--max-items``."""
        if not entries:
            raise ApiError(400, f"{param} is empty", param=param)
        if len(entries) > self.max_items:
            raise ApiError(400, f"{param} has {len(entries)} entries; the limit is {self.max_items} per request", param=param)

    def check_vocab(self, ids: list[int], param: str) -> None:
        bad = [t for t in ids if t >= self.vocab]
        if bad:
            raise ApiError(400, f"{param} has token id {bad[0]}, outside the vocabulary (size {self.vocab})", param=param)

    def check_ids(self, ids: list[int], param: str, truncate: int | None) -> list[int]:
        if not ids:
            raise ApiError(400, f"{param} has no tokens", param=param)
        self.check_vocab(ids, param)
        if truncate is not None:
            if truncate > self.max_model_len:
                raise ApiError(400, f"truncate_prompt_tokens={truncate} exceeds the maximum length {self.max_model_len}", param="truncate_prompt_tokens")
            ids = ids[-truncate:]
        if len(ids) > self.max_model_len:
            raise ApiError(
                400,
                f"{param} has {len(ids)} tokens; the maximum length is {self.max_model_len} "
                "(set truncate_prompt_tokens to keep only the last k tokens)",
                param=param,
            )
        return ids

    def labels_for(self, label_token_ids: list[int] | None, param: str = "label_token_ids") -> list[int]:
        ids = label_token_ids if label_token_ids is not None else self.label_ids
        if not ids:
            raise ApiError(400, "no label tokens: pass label_token_ids or start the server with --labels", param=param)
        self.check_vocab(ids, param)
        return ids

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise ApiError(404, f"the model {name!r} does not exist; this server serves {self.model_name!r}", "not_found_error", "model")

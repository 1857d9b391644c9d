"""OpenAI's two shapes of log-probabilities, from the scheduler's `Scored` events.

- Chat (`logprobs: true`, `top_logprobs: 0..20`): `choices[].logprobs.content` is a list of
  `{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}`, one per generated token.
- Completions (`logprobs: 0..5`, the legacy shape): `choices[].logprobs` is
  `{tokens, token_logprobs, top_logprobs: [{token: logprob}], text_offset}`.

A token's text is its bytes decoded as UTF-8 (a token holding part of a character shows U+FFFD;
`bytes` has the exact bytes); control tokens by their text (`</s>`).
"""

from __future__ import annotations

from typing import Callable

from localmix.runtime.scheduler import Scored


class Names:
    """Token id -> (text, bytes), cached: a reply names the same few tokens again and again."""

    def __init__(self, piece: Callable[[int, bool], bytes]):
        self.piece, self.seen = piece, {}

    def __call__(self, token: int) -> tuple[str, list[int]]:
        if token not in self.seen:
            raw = self.piece(token, True)
            self.seen[token] = (raw.decode("utf-8", errors="replace"), list(raw))
        return self.seen[token]


def chat(scores: list[Scored], names: Names) -> dict:
    def entry(token: int, logprob: float) -> dict:
        text, raw = names(token)
        return {"token": text, "logprob": logprob, "bytes": raw}

    return {"content": [{**entry(s.token, s.logprob), "top_logprobs": [entry(t, lp) for t, lp in s.top]}
                        for s in scores], "refusal": None}


def legacy(scores: list[Scored], names: Names, offset: int) -> dict:
    """`offset`: where the first token's text starts (OpenAI counts from the prompt's start)."""
    tokens, offsets = [], []
    for s in scores:
        offsets.append(offset)
        tokens.append(names(s.token)[0])
        offset += len(tokens[-1])
    return {"tokens": tokens, "token_logprobs": [s.logprob for s in scores],
            "top_logprobs": [{names(t)[0]: lp for t, lp in s.top} for s in scores], "text_offset": offsets}

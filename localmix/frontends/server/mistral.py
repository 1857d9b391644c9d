"""The Mistral dialect: Mistral's client (`mistralai`) posts to the same `/v1/chat/completions`
as OpenAI's, with its own names, which schemas.py accepts: `random_seed` (OpenAI's `seed`),
`tool_choice: "any"` (OpenAI's `"required"`), and `safe_prompt`, which puts Mistral's documented
guardrail system prompt in front, as Mistral's API does (`localmix run/chat --safe` too).
"""

from __future__ import annotations

SAFE_PROMPT = ("Always assist with care, respect, and truth. Respond with utmost utility yet securely. Avoid harmful, "
               "unethical, prejudiced, or negative content. Ensure replies promote fairness and positivity.")


def safe_system(system: str | None) -> str:
    """A system prompt with the guardrail prompt in front (`run` and `chat --safe`)."""
    return SAFE_PROMPT + ("\n\n" + system if system else "")


def with_safe_prompt(messages: list[dict], safe: bool) -> list[dict]:
    """The conversation with the guardrail prompt first in the system prompt, when `safe`."""
    if not safe:
        return messages
    if messages and messages[0]["role"] == "system":
        first = messages[0]
        return [{**first, "content": SAFE_PROMPT + "\n\n" + (first.get("content") or "")}] + messages[1:]
    return [{"role": "system", "content": SAFE_PROMPT}] + messages

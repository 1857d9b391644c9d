"""`localmix serve`: one engine behind the OpenAI, ollama and Mistral HTTP APIs, and a chat page.

  run.py         the command: flags, loading, serving until a signal
  app.py         the ASGI app and its safety checks, /health, /metrics
  openai.py      the OpenAI dialect: chat, completions, models
  ollama.py      the ollama dialect
  mistral.py     the Mistral dialect (its names on OpenAI's endpoint)
  fim.py         Mistral's fill in the middle
  webui.py       the chat page at / (its HTML, CSS and JavaScript are in static/)
  schemas.py     the request models (pydantic)
  structured.py  JSON output and tool calls, for every dialect
  grammar.py     JSON schema -> GBNF grammar, or a 400 naming the keyword it cannot enforce
  patterns.py    the inside of a JSON string as GBNF: regex patterns and formats
  numbers.py     numbers as GBNF: integer ranges, decimals between bounds, multiples
  toolcalls.py   Mistral's native tool calls
  logprobs.py    OpenAI's two shapes of log-probabilities
  common.py      what the dialects share: state, errors, running a request on the scheduler
The batched scheduler itself knows no HTTP: it is localmix/runtime/scheduler.py.
"""

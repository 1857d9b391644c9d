"""`localmix serve`: one engine behind the OpenAI, ollama and Mistral HTTP APIs.

app.py (the ASGI app and its safety checks), one module per dialect (openai.py, ollama.py,
mistral.py), schemas.py (the request models), structured.py (JSON output and tool calls),
common.py (what the dialects share), scheduler.py (the batched llama.cpp scheduler, no HTTP),
run.py (the command).
"""

"""Front ends: what a person or another program talks to.

`cli` (the typer app, thin glue over functions), `load` (open a GGUF in the engine asked for:
the one module that knows both engines), `chat` and `commands` (the terminal chat and its
slash commands), `oneshot` (prompts from pipes), `hub` (models by name: pull, resolve, list,
remove), `progress` and `render` (progress bars and tables).

May import every stage below: localmix.native, localmix.fixtures, localmix.runtime,
localmix.convert, localmix.gguf, localmix.kernels.
"""

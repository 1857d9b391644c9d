"""Front ends: what a person or another program talks to.

  cli.py        the typer app, thin glue over functions
  load.py       open a GGUF in the engine asked for: the one module that knows both engines
  chat.py       `localmix chat`: the loop
  session.py    the chat's conversation, and one reply streamed on a worker thread
  terminal.py   the chat's \"\"\" blocks, and its terminal and pipe UIs
  commands.py   the chat's slash commands
  oneshot.py    prompts from pipes (`localmix run`)
  evaluate.py   `localmix eval`
  fit.py        `localmix quantize --fit`
  hub.py        models by name: pull, resolve, list, remove
  progress.py   progress bars
  render.py     tables and the stats line
  server/       `localmix serve`: the HTTP APIs

May import every stage below: localmix.native, localmix.fixtures, localmix.runtime,
localmix.convert, localmix.gguf, localmix.kernels.
"""

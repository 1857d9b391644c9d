"""Front ends: what a person or another program talks to.

  cli.py        the typer app, thin glue over functions; the commands that run a model
  cli_files.py  the commands that write or measure model files (quantize, imatrix, eval, synth, experts)
  options.py    the options commands share, defined once: Load, and the flags of Load and Sampling
  load.py       open a GGUF in the engine asked for: the one module that knows both engines
  chat.py       `localmix chat`: the loop
  session.py    the chat's conversation, and one reply streamed on a worker thread
  terminal.py   the chat's \"\"\" blocks, and its terminal and pipe UIs
  commands.py   the chat's slash commands
  oneshot.py    prompts from pipes (`localmix run`)
  evaluate.py   `localmix eval`
  quantize.py   `localmix quantize`: a fixed mix, or a fitted one
  fit.py        `localmix quantize --fit`
  demo.py       `localmix demo`
  worker.py     `localmix worker`: this machine's device served to `--rpc` on another
  hub.py        models by name: pull, resolve, list, remove
  progress.py   progress bars
  render.py     tables and the stats line
  server/       `localmix serve`: the HTTP APIs

May import every stage below: localmix.native, localmix.fixtures, localmix.runtime,
localmix.convert, localmix.gguf, localmix.kernels.
"""

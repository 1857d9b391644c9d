"""Runtime: what running a GGUF takes, whichever engine runs it, and the llama.cpp engine.

  engine.py     the Engine protocol: what run, chat, serve and eval rely on
  stream.py     the streaming events: Sampling settings, Piece and Done events, the shared reply loop
  llama.py      the llama.cpp engine, and the one adapter to llama-cpp-python's private handles
  scheduler.py  N sequences decoded together through llama.cpp's batch API (no HTTP)
  log.py        llama.cpp's log: on stderr with --verbose, otherwise nowhere
  vocab.py      a GGUF's vocabulary as llama.cpp reads it
  template.py   chat templates: a conversation -> prompt text
  prompt.py     a conversation's prompt tokens, for any GGUF (and FIM prompts)
  tools.py      Mistral's native tool-calling prompts
  memory.py     the memory estimate and the fit check
  planner.py    where the tensors go: GPU, Metal or CPU
  devices.py    the machine's free VRAM and RAM
  offload.py    how llama.cpp is told the placement
  rpc.py        llama.cpp's RPC backend: serve a device to another machine, use other machines' devices
  evaluate.py   `localmix eval`'s measurement: KL divergence from a reference
  kld.py        llama-perplexity's KL-divergence statistics

May import: localmix.convert, localmix.gguf, localmix.kernels, localmix.errors, localmix.units.
Never the native engine: the front ends' `load` chooses between the two.
"""

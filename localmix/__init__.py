"""localmix: run Mixtral-class mixture-of-experts models on your own desktop.

The API is a handful of functions; the `localmix` command is thin glue over them. The
packages are the stages; each imports only those below it in this list (import-linter
checks it):
  frontends/  what people and programs talk to: the CLI, chat, pipes, the HTTP server
  native/     localmix's own forward in numpy, the second engine
  fixtures/   models made up for tests, the demo and benchmarks
  runtime/    running a GGUF: the llama.cpp engine, placement, prompts, streaming
  convert/    a Hugging Face checkpoint becomes a GGUF file
  gguf/       the GGUF file itself: read, check, write
  kernels/    float32 rows <-> the bytes of each GGML tensor type
Beside them, imported by all and importing none: errors.py (the exception types and exit
codes), units.py (sizes as people read them), outfile.py (outputs never left half-written) and
paths.py (where localmix keeps its files).
"""

__version__ = "0.1.0"

"""The native engine: localmix's own Mixtral/Mistral forward in numpy over the memory-mapped GGUF.

  weights.py      tensors as views of the mapping, and the hyperparameters the forward needs
  model.py        the forward, read top to bottom
  sampler.py      llama.cpp's sampler chain
  engine.py       the engine behind the runtime's streaming interface
  experts.py      router introspection: which experts a prompt uses
  stats.py        importance statistics, as llama-imatrix collects them
  sensitivity.py  what each tensor's quantization costs: the curves `quantize --fit` solves over

May import: localmix.runtime (the engine interface), localmix.convert, localmix.gguf,
localmix.kernels, localmix.errors, localmix.units.
"""

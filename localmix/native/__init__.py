"""The native engine: localmix's own Mixtral/Mistral forward in numpy over the memory-mapped GGUF.

`weights` (tensors as views of the mapping), `model` (the forward, read top to bottom),
`sampler` (llama.cpp's sampler chain), `engine` (the engine behind the runtime's streaming
interface), `experts` (router introspection) and `stats` (importance statistics, as
llama-imatrix collects them).

May import: localmix.runtime (the engine interface), localmix.convert, localmix.gguf,
localmix.kernels, localmix.errors, localmix.units.
"""

"""The GGUF file itself: `read` (open a file, read a key), `check` (is it a GGUF llama.cpp
can load: header, metadata, tensor table, extents), `write` (the header and streamed tensor
data, written atomically) and `info` (a summary of what a file holds).

May import: localmix.kernels, localmix.errors, localmix.units (and the `gguf` package).
"""

"""The GGUF file itself: `read` (open a file bounds-checked, arrays in bulk, read a key),
`meaning` (what the header says: would llama.cpp's loader refuse it or abort on it?), `check`
(both: is it a GGUF llama.cpp can load), `scan` (compiled scans of string arrays), `sandbox`
(the Jinja2 environment chat templates compile and run in), `write` (the header and streamed
tensor data, written atomically) and `info` (a summary of what a file holds).

May import: localmix.kernels, localmix.errors, localmix.units (and the `gguf`, `numba` and
`jinja2` packages).
"""

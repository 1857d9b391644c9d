"""The GGUF file itself:
  read.py     open a file bounds-checked, arrays in bulk, read a key
  meaning.py  what the header says: would llama.cpp's loader refuse it or abort on it?
  check.py    both: is it a GGUF llama.cpp can load
  scan.py     compiled scans of string arrays
  sandbox.py  the Jinja2 environment chat templates compile and run in
  write.py    the header and streamed tensor data, written atomically
  info.py     a summary of what a file holds

May import: localmix.kernels, localmix.errors, localmix.units (and the `gguf`, `numba` and
`jinja2` packages).
"""

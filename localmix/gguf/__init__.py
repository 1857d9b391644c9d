"""The GGUF file itself:
  read.py     open a file bounds-checked, arrays in bulk, read a key
  meaning.py  what the header says: would llama.cpp's loader refuse it or abort on it?
  check.py    both: is it a GGUF llama.cpp can load
  scan.py     scans of string arrays: plain loops, the reference
  scan_jit.py the same scans compiled by numba, for long arrays
  sandbox.py  the Jinja2 environment chat templates compile and run in
  write.py    the header and streamed tensor data, written atomically
  info.py     a summary of what a file holds

May import: localmix.kernels, localmix.errors, localmix.units (and the `gguf`, `numba` and
`jinja2` packages).
"""

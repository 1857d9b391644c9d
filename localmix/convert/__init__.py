"""Convert: a Hugging Face checkpoint (or a float GGUF) becomes a GGUF file of chosen types.

The flow, a module a step:
  config.py      config.json -> ModelConfig
  checkpoint.py  safetensors shards, validated, one tensor at a time
  mapped.py      a tensor's float rows through short-lived memory maps
  sources.py     a checkpoint or a float GGUF, seen the same way
  names.py       HF names -> GGUF names in one table, expert stacking, shape checks
  vocab.py       the SentencePiece vocabulary, special tokens and chat template
  filetypes.py   the file types' names, importing nothing (the command line's --help)
  mix.py         a file type -> the type of every tensor (llama.cpp's mixes)
  imatrix.py     importance-matrix files (llama-imatrix's)
  fit.py         `quantize --fit`: the per-tensor types that lose least for a byte budget
  pipeline.py    the streaming conversion
  presets.py     real models' tensor tables, as this stage would write them, without weights

May import: localmix.gguf, localmix.kernels, localmix.errors, localmix.units.
"""

"""Convert: a Hugging Face checkpoint (or a float GGUF) becomes a GGUF file of chosen types.

The flow, a module a step: `config` (config.json -> ModelConfig), `checkpoint` and `mapped`
(safetensors shards, validated and memory-mapped), `names` (HF names -> GGUF names, expert
stacking, shape checks), `sources` (a checkpoint or a float GGUF seen the same way), `vocab`
(the SentencePiece vocabulary), `mix` (a file type -> the type of every tensor, llama.cpp's
mixes), `imatrix` (importance-matrix files), `pipeline` (the streaming conversion) and
`presets` (real models' tensor tables, as this stage would write them, without weights).

May import: localmix.gguf, localmix.kernels, localmix.errors, localmix.units.
"""

"""Runtime: what running a GGUF takes, whichever engine runs it, and the llama.cpp engine.

`stream` is the engine interface (Sampling settings, Piece and Done events, the reply loop
both engines share); `llama` the llama.cpp engine; `memory` the memory estimate and fit check;
`planner`, `devices` and `offload` where the tensors go (GPU, Metal or CPU) and how llama.cpp
is told; `template` chat templates and prompt tokens.

May import: localmix.convert, localmix.gguf, localmix.kernels, localmix.errors, localmix.units.
Never the native engine: the front ends' `load` chooses between the two.
"""

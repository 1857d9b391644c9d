"""The file types `localmix quantize` writes, by llama.cpp's names, in the order `--help` lists
them. Plain names, importing nothing: the command line shows them without loading gguf or the
kernels (mix.py maps each to its llama.cpp file type and base tensor type)."""

NAMES = ("F32", "F16", "BF16", "Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q4_K_M", "Q4_K_S", "Q3_K_L", "Q3_K_M",
         "Q3_K_S", "Q2_K", "IQ4_XS", "IQ4_NL", "IQ3_M", "IQ3_S", "IQ3_XS", "IQ3_XXS")

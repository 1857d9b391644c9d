"""`python quantize.py SRC OUT --type TYPE` is `localmix quantize SRC OUT --type TYPE`."""

import sys

from localmix.frontends.cli import main

if __name__ == "__main__":
    main(["quantize", *sys.argv[1:]])

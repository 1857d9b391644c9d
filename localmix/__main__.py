"""`python -m localmix` is the `localmix` command."""

from .cli import main

main()

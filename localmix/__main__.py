"""`python -m localmix` is the `localmix` command."""

from localmix.frontends.cli import program

program()

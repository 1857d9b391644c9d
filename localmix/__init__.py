"""localmix: run Mixtral-class mixture-of-experts models on your own desktop.

The API is a handful of functions; the `localmix` command is thin glue over them.
"""

__version__ = "0.1.0"

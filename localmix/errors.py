"""The one exception type for mistakes a user can make, and the exit codes the CLI maps them to.

Anything raised as `LocalmixError` is printed as one line on stderr with no traceback;
everything else is a bug and keeps its traceback.
"""

EXIT_RUNTIME = 1   # an I/O fault or a runtime failure: disk full, unwritable directory, ...
EXIT_USAGE = 2     # bad usage or bad input: a broken checkpoint, an unsupported model, ...
EXIT_INTERRUPTED = 130


class LocalmixError(Exception):
    """A problem with the user's input or environment, explained in one line."""

    exit_code = EXIT_USAGE


class InputError(LocalmixError):
    """The input is bad: a missing or corrupt file, an unsupported model, a bad flag value."""

    exit_code = EXIT_USAGE


class OutputError(LocalmixError):
    """Writing failed: the directory is not writable, the disk is full, ..."""

    exit_code = EXIT_RUNTIME

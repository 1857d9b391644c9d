"""A rich progress bar for long jobs on a terminal; silence in a pipe."""

from __future__ import annotations

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)


class ConvertProgress:
    """Shows tensors done, bytes written, rate and ETA. Use as a context manager."""

    def __init__(self, console: Console):
        self.enabled = console.is_terminal
        self.bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), TaskProgressColumn(),
                            TextColumn("{task.fields[tensors]}"), DownloadColumn(binary_units=True),
                            TransferSpeedColumn(), TimeRemainingColumn(), TextColumn("[dim]{task.fields[current]}"),
                            console=console, transient=False, disable=not self.enabled)
        self.task = None
        self.n_tensors = 0
        self.done = 0

    def __enter__(self):
        self.bar.__enter__()
        return self

    def __exit__(self, *exc):
        return self.bar.__exit__(*exc)

    def start(self, n_tensors: int, n_bytes: int) -> None:
        self.n_tensors = n_tensors
        self.task = self.bar.add_task("converting", total=n_bytes, tensors=f"0/{n_tensors} tensors", current="")

    def advance(self, tensor: str, n_bytes: int, tensor_done: bool) -> None:
        self.done += tensor_done
        self.bar.update(self.task, advance=n_bytes, tensors=f"{self.done}/{self.n_tensors} tensors", current=tensor)

"""How the library reports progress: a protocol the CLI fills with a bar, and a silent default."""

from __future__ import annotations

from typing import Protocol


class Progress(Protocol):
    """A progress display; the CLI draws a bar on stderr, the library only reports counts."""

    def start(self, total: int, description: str) -> None: ...
    def advance(self, n: int = 1) -> None: ...
    def close(self) -> None: ...


class NoProgress:
    """Reports nowhere: the default when the caller passes no progress display."""

    def start(self, total: int, description: str) -> None:
        pass

    def advance(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass

"""Exceptions raised by the library; each message says what to do about it."""

from __future__ import annotations


class SimsearchError(Exception):
    """Base class: the CLI prints the message on one line and exits non-zero."""

    exit_code = 1


class InputError(SimsearchError):
    """The user asked for something that does not exist or cannot be read."""

    exit_code = 2


class ImageError(SimsearchError):
    """A file could not be decoded as an image; the message is the reason."""


class StoreError(SimsearchError):
    """The store directory or database is unusable."""


class StoreLockedError(StoreError):
    """Another process is writing to the same store."""

    exit_code = 3


class ModelMismatchError(SimsearchError):
    """The store's vectors were made by another model than the one asked for."""


class WeightsUnavailableError(SimsearchError):
    """Pretrained weights could not be found or downloaded."""

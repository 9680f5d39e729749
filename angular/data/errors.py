"""The error of bad input data, in a module of its own so that every data module (the manifest,
RecordIO, alignment, verification bins) can raise it without importing another."""

__all__ = ["DataError"]


class DataError(ValueError):
    """Bad input data; the message names the file, folder, record or parameter."""

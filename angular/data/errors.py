"""The error of bad input data, in a module of its own so that every data module (the manifest,
RecordIO, alignment, verification bins) can raise it without importing another."""

__all__ = ["DataError"]

# How a DataLoader worker's exception comes back to the main process (torch's ExceptionWrapper):
# the same type, built from "Caught <type> in DataLoader worker process <n>.\nOriginal Traceback
# (most recent call last):\n...\n<module>.DataError: <message>".
_FROM_WORKER = "Caught DataError in DataLoader worker process "


class DataError(ValueError):
    """Bad input data; the message names the file, folder, record or parameter.

    Raised in a DataLoader worker (a bad record or image met while training), it reaches the main
    process as its one line, with the worker named, instead of the worker's traceback."""

    def __init__(self, message: str = ""):
        if isinstance(message, str) and message.startswith(_FROM_WORKER):
            worker = message[len(_FROM_WORKER) :].split(".", 1)[0]
            last = message.rstrip().rsplit("\n", 1)[-1]
            original = last.partition("DataError: ")[2]
            if original:
                message = f"{original} (in DataLoader worker {worker})"
        super().__init__(message)

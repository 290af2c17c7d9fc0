"""The one error type for bad user input, and where data errors become it.

Every layer of piece_mm and eval raises `InputError` with the file, field and value in the message; the CLIs turn it
into one line on stderr and exit code 2. tasks/ is data only and imports nothing of piece_mm: it says what is wrong
with a file as a plain ValueError with the same kind of message, and `from_data` turns that into an InputError where
piece_mm or eval calls into tasks/."""
from __future__ import annotations

import contextlib


class InputError(ValueError):
    pass


@contextlib.contextmanager
def from_data():
    """Inside: a ValueError (tasks/' bad-file message, a malformed JSON or UTF-8 file) is re-raised as InputError with
    its message. Also a decorator (`@from_data()`)."""
    try:
        yield
    except InputError:
        raise
    except ValueError as e:
        raise InputError(str(e).splitlines()[0] if str(e) else type(e).__name__) from e

"""One exception family: the CLI maps every GGUFExpertsError to one line on stderr and exit code 2."""
from __future__ import annotations


class GGUFExpertsError(Exception):
    """Base of every error this package raises on bad input; the message is meant for a person.

    Messages say what is wrong, where (file, offset, tensor) and what to do about it.
    """


class GGUFFormatError(GGUFExpertsError):
    """A GGUF file that cannot be read: bad magic, truncated header, unknown type id, ..."""


class UnsupportedTypeError(GGUFFormatError):
    """A ggml type id that was removed from ggml or that this table does not know."""


class ShardError(GGUFExpertsError):
    """A split model whose shards are missing or inconsistent."""


class TraceFormatError(GGUFExpertsError):
    """A trace file with a bad magic, an unknown version or an unreadable header."""


class ModelMismatchError(GGUFExpertsError):
    """A trace joined with a model other than the one it was captured from."""


class OutputError(GGUFExpertsError):
    """An output that cannot be written: a missing or read-only directory, a directory given as a file,
    an output that would replace an input."""


class InputError(GGUFExpertsError):
    """Any other bad input: a malformed CSV, a missing column, an impossible option value."""


class LiveUnavailableError(GGUFExpertsError):
    """llama-cpp-python (the [live] extra) is not installed or its library lacks a symbol we need."""


class GGUFExpertsWarning(UserWarning):
    """Something a person should know that is not an error (the CLI prints it as one 'warning:' line)."""

"""One exception type for every user-facing problem.

Library code raises `MammoSaeError` (or a subclass) with a message that names the problem
(the file, the column, the key, the valid choices). The CLI prints the message and exits 2,
without a traceback. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class MammoSaeError(Exception):
    """A problem with the user's input or environment, explained in the message."""


class DataError(MammoSaeError):
    """Bad dataset input: missing files or columns, corrupt images, empty selections."""


class CheckpointError(MammoSaeError):
    """A checkpoint that cannot be loaded: unknown layout, bad keys, unsafe pickle."""


class StoreError(MammoSaeError):
    """An activation store that is incomplete, corrupt or made with other settings."""


def choices_message(kind: str, value: object, valid: list[str] | tuple[str, ...]) -> str:
    """`unknown concept 'Foo'; valid: Mass, ...` — used wherever a name is looked up."""
    return f"unknown {kind} {value!r}; valid: {', '.join(map(str, valid))}"


# Problems with a run's files that make one report section (or latent-page part) fail without
# stopping the report: it shows a note there instead.
SECTION_ERRORS = (MammoSaeError, OSError, KeyError, ValueError, TypeError, IndexError)

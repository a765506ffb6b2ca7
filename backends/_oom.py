"""What every backend says when an out-of-memory error leaves its process unable to train on."""

from __future__ import annotations

from autobatch.core.adaptive import UnrecoverableOOMError, first_line

__all__ = ["unrecoverable_oom"]

# The way out is the same for every framework: only a new process has its memory back.
_ADVICE = "start a new process with a smaller micro-batch (autobatch train does this itself, from its last checkpoint)"


def unrecoverable_oom(error: BaseException, what_happened: str) -> UnrecoverableOOMError:
    """``error`` as an :class:`UnrecoverableOOMError`.

    ``what_happened`` says, in the framework's terms, why this process cannot go on; its
    ``{detail}`` is replaced by the error in one line, and the advice follows it.
    """
    detail = first_line(error)
    return UnrecoverableOOMError(f"{what_happened.format(detail=detail)} {_ADVICE}", detail=detail)

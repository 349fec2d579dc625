"""Exceptions hessdist raises; each message names the fix."""


class HessdistError(Exception):
    """Base class of every error hessdist raises on purpose."""


class InputError(HessdistError, ValueError):
    """Bad input: wrong shapes, empty data, unresolvable import path, bad options."""


class NonFiniteError(HessdistError, FloatingPointError):
    """The loss or a curvature product is NaN or infinite."""


class NonDeterministicError(HessdistError):
    """Two products of the same vector differ: the operator is not a fixed linear map."""


class WorkerError(HessdistError, RuntimeError):
    """A worker died or timed out more often than the retry budget allows, or could not start."""


class OutOfMemory(HessdistError, MemoryError):
    """The device ran out of memory even at the smallest micro-batch that keeps the answer exact."""


class QueueFull(HessdistError, RuntimeError):
    """``submit`` found the service's queue full (``max_queued``) and ``when_full="reject"``:
    the step was not queued."""


class Superseded(HessdistError):
    """A queued step dropped, before it ran, for a newer one (``when_full="coalesce"``).
    ``step``: the dropped step; ``by``: the step whose submission pushed it out."""

    def __init__(self, message: str, step: int | None = None, by: int | None = None):
        super().__init__(message)
        self.step, self.by = step, by

    def __reduce__(self):                  # keep step and by through Ray's pickling
        return type(self), (str(self), self.step, self.by)

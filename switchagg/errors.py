"""Typed errors, chosen by what the caller does next.

Every error raised by switchagg to a user is a `SwitchError`. The subclass says what to do:

- `SwitchTimeout`: nothing arrived in time; check that the switch and every worker run (retry may help).
- `JoinRejected`: the switch refused the JOIN; fix the job parameters (the message names the field).
- `JobAborted`: the job is gone (a worker died or left, or the switch restarted); start the job again.
- `ProtocolError`: bytes or fields that break the wire contract; a bug or a version mismatch.
- `NonFiniteGradient`: a gradient holds NaN or Inf; nothing was sent (lower the learning rate).
- `DeviceUnavailable`: a CUDA kernel was asked for where cupy or a GPU is missing.
- `ConfigError`: a setting is out of range or no valid choice; fix the named field.

Errors carry their context as attributes (job, rank, field, value) as well as in the message, so
callers can act on them without parsing text. This module imports nothing: the switch uses it too.
"""

from __future__ import annotations

__all__ = ["SwitchError", "SwitchTimeout", "JoinRejected", "JobAborted", "ProtocolError",
           "NonFiniteGradient", "DeviceUnavailable", "ConfigError"]


class SwitchError(Exception):
    """Base class of every error switchagg raises on purpose.

    Attributes:
        job: the job name, where known.
        rank: the worker rank the error concerns, where known.
        field: the offending field, for validation errors.
        value: the offending value, for validation errors.
    """

    def __init__(self, message: str, *, job: str | None = None, rank: int | None = None,
                 field: str | None = None, value: object = None) -> None:
        super().__init__(message)
        self.job = job
        self.rank = rank
        self.field = field
        self.value = value


class SwitchTimeout(SwitchError, TimeoutError):
    """A wait ran out: the switch or some worker did not answer in time."""


class JoinRejected(SwitchError):
    """The switch refused to admit this worker to the job."""


class JobAborted(SwitchError):
    """The job was aborted (a worker died or left, the switch restarted or shut down)."""


class ProtocolError(SwitchError, ValueError):
    """Bytes or fields that break the wire contract (switchagg/packet.py, switchagg/protocol.py)."""


class NonFiniteGradient(SwitchError, ValueError):
    """A gradient holds NaN or Inf: no integer scale can represent it, so nothing was sent."""


class DeviceUnavailable(SwitchError, RuntimeError):
    """A CUDA kernel was asked for, but cupy, the CUDA driver or a device is missing."""


class ConfigError(SwitchError, ValueError):
    """A setting is out of range or names no valid choice (`.field` and `.value` say which)."""

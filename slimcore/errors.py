"""Errors a user can act on.

Anything raised as ``SlimError`` is printed as one line by the CLI and becomes a 4xx/`failed` job with
that detail in the service; anything else is a bug and surfaces as such.
"""

from __future__ import annotations


class SlimError(Exception):
    """A problem with the user's input or a job that cannot honestly succeed.

    ``kind`` is a short stable slug (used as the problem+json ``type`` suffix) so clients can branch on it
    without parsing prose.
    """

    kind = "bad-input"

    def __init__(self, detail: str, *, kind: str | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        if kind is not None:
            self.kind = kind

    def __str__(self) -> str:
        return self.detail


class UnsupportedModel(SlimError):
    """The model file is valid but uses something the lifter cannot turn into a prunable graph."""

    kind = "unsupported-model"


class ParityError(SlimError):
    """A transformed model no longer computes what the original did."""

    kind = "parity"


class NothingToPrune(SlimError):
    """The job would succeed while removing nothing: FINDINGS calls this a silent no-op."""

    kind = "nothing-to-prune"


class JobCanceled(Exception):
    """Raised inside the pipeline when the caller's ``should_stop`` says so; not a failure."""

"""Errors a user can act on, kept apart from bugs so every rank can report them plainly."""


class FluxDistError(Exception):
    """Bad input or configuration: one clear message, non-zero exit on every rank."""


class NotSupportedError(FluxDistError):
    """A feature that is not built (yet) for this combination; raised, never faked."""

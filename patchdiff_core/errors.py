"""Errors that carry a message meant for the user (the CLI prints them as one line, exit code 2)."""


class PatchdiffError(ValueError):
    """A problem with the user's input: bad argument, file or request."""


class CheckpointError(PatchdiffError):
    """A weights file that cannot be read or does not fit the configuration."""


class Cancelled(Exception):
    """Raised from a sampling callback to stop a job at the next step."""

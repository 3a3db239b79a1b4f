"""Errors that report a problem with the user's input rather than a bug.

The command line prints these as one message, without a traceback.
"""


class CrackjaxError(Exception):
    """A problem the user can fix; the message names the value and the fix."""


class DatasetError(CrackjaxError):
    """The image folder cannot give a usable dataset (empty class, one class, too few images)."""


class ImageError(CrackjaxError):
    """One image file cannot be read."""

    def __init__(self, path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


class ModelError(CrackjaxError):
    """A model folder is missing, incomplete or corrupt."""

"""Errors that report a problem with the user's input rather than a bug.

The command line prints these as one message, without a traceback.
"""


class CrackjaxError(Exception):
    """A problem the user can fix; the message names the value and the fix."""


class DatasetError(CrackjaxError):
    """The image folder cannot give a usable dataset (empty class, one class, too few images).

    `rejected` lists the files left out before the error, so a caller can still write
    the rejected-files report.
    """

    def __init__(self, message: str, rejected: list | None = None):
        super().__init__(message)
        self.rejected = list(rejected or [])


class ImageError(CrackjaxError):
    """One image file cannot be read."""

    def __init__(self, path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


class ModelError(CrackjaxError):
    """A model folder is missing, incomplete or corrupt."""


class DiskFullError(CrackjaxError):
    """A write failed because the disk is full, a file-size limit was reached or a quota is used up."""

"""Errors that name the file at fault and say how to fix it.

Every error a user can cause by pointing the library at bad input derives from
``PatchCoreError`` so that the CLI can print it without a traceback.
"""


class PatchCoreError(Exception):
    """Base class: a problem with the user's input, not a bug in the library."""


class DataError(PatchCoreError, ValueError):
    """An image, mask or folder that cannot be used (names the path and the fix)."""


class ModelFileError(PatchCoreError, ValueError):
    """A saved model that is corrupt, tampered with, or written by another version."""


class WeightsNotFoundError(PatchCoreError, FileNotFoundError):
    """Pretrained backbone weights that are not on this machine (says where to put them)."""


class DownloadError(PatchCoreError):
    """A dataset that could not be fetched, verified or unpacked (says what to do next)."""

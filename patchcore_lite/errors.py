"""Errors that name the file at fault and say how to fix it.

Every error a user can cause by pointing the library at bad input derives from
``PatchCoreError`` so that the CLI can print it without a traceback. Settings are
checked when a configuration is built (``check_*`` below), before any work.
"""

from __future__ import annotations

import math
import numbers
import os
import stat
from collections.abc import Callable, Iterable


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


class ConfigError(PatchCoreError, ValueError):
    """A setting out of range or unknown: names the setting, the value and what is allowed."""


def check_setting(ok: bool, name: str, value: object, valid: str) -> None:
    """Raise ``ConfigError("name = value: must be valid")`` unless ``ok``."""
    if not ok:
        raise ConfigError(f"{name} = {value!r}: must be {valid}")


def check_choice(name: str, value: object, choices: Iterable[object]) -> None:
    """Refuse a value that is not one of ``choices``, listing them."""
    choices = list(choices)
    check_setting(value in choices, name, value, f"one of {', '.join(map(str, choices))}")


def check_int(name: str, value: object, minimum: int = 1, why: str = "") -> None:
    """Refuse anything but an integer >= ``minimum`` (bools are not integers here)."""
    ok = isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= minimum
    check_setting(ok, name, value, f"an integer >= {minimum}{why}")


def check_real(name: str, value: object, ok: Callable[[float], bool], valid: str) -> None:
    """Refuse anything but a finite number for which ``ok`` holds."""
    real = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    check_setting(real and ok(float(value)), name, value, valid)  # type: ignore[arg-type]


def shown(path: object) -> str:
    """``path`` as one printable line: undecodable bytes as \\xNN, control characters (newline, U+2028)
    escaped, so that a message promising one line keeps it whatever the file system allows in names."""
    text = os.fsencode(str(path)).decode("utf-8", "backslashreplace")
    return "".join(c if c.isprintable() or c == " " else repr(c)[1:-1] for c in text)


def file_kind(mode: int) -> str:
    """What an ``os.stat`` mode describes, for messages: a FIFO, socket or device is never opened."""
    if stat.S_ISFIFO(mode):
        return "FIFO (named pipe)"
    if stat.S_ISSOCK(mode):
        return "socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "device"
    return "folder" if stat.S_ISDIR(mode) else "file"

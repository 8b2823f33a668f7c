"""patchcore_lite: PatchCore and the methods around it, small enough to read in an afternoon."""

__version__ = "0.1.0"

from .download import data_root  # noqa: E402  (after __version__, which download.py reads)

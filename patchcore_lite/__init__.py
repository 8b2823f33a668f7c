"""patchcore_lite: PatchCore and the methods around it, small enough to read in an afternoon."""

__version__ = "0.1.0"

from .datasets import data_root  # noqa: E402, F401  (after __version__, which tools.download reads)

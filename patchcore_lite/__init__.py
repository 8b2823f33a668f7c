"""patchcore_lite: PatchCore and the methods around it, small enough to read in an afternoon."""

__version__ = "0.1.0"

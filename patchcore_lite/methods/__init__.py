"""The other detectors: SPADE and PaDiM, which PatchCore grew from, and CFA, its sequel.

Each builds on the core modules (backbone, patches, knn, scoring, detector) as PatchCore does.
"""

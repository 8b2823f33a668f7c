"""The tools around the method: the command line, dataset downloads, the comparison of
detectors and the tables results are written as. The top layer: it may import everything.
"""

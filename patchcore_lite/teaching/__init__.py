"""What the chapters use to show the method: plots, sliders, flipbooks, experiments, the
hypersphere toy, the embedded synthetic data and the measurements the figures are made of.

Nothing in the core or the other detectors imports from here.
"""

"""Calibration of guard thresholds from benign reference edits (`invarlock calibrate`).

`recipe` holds the pure statistics (κ by order statistic or parametric rule, ε quantiles,
VE min effect, window sizing); `perturb` the quantisation-noise reference edit; `runner`
certifies the reference edits and writes the override preset with its statistics.
"""

"""Calibration of guard thresholds from benign reference edits (`invarlock calibrate`).

`recipe` holds the pure statistics (κ by order statistic or parametric rule, ε quantiles,
VE min effect, window sizing); `perturb` the quantisation-noise reference edit; `runner`
certifies the reference edits and writes the override preset with its statistics; `tiers`
recomputes the shipped tier values from the committed raw rows; `coverage` simulates how
often the gate's upper bound misses the truth.
"""

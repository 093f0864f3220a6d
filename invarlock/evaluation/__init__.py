"""The parts of scoring windows (``invarlock.evaluate``): batch sizing and the memory budget,
per-window losses from whole logits, and the output head applied in pieces."""

"""Pre-training methods, one module each (MultiMAE; the two-stage RGB-D method)."""

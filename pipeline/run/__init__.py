"""What keeps a run safe and resumable: checkpoints, the run directory, signals, metrics, integrity checks."""

"""Training data: packed text and instruction examples, per-rank batches, the token store."""

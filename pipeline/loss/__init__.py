"""The distillation losses: the divergences and methods (pure tensor maths) and the vocab-parallel fused loss."""

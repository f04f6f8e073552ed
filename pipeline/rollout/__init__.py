"""On-policy generation: the HF decode loop (gather-once replica or lockstep) and the vLLM engine."""

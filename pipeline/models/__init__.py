"""The student and the teacher: built from local HF checkpoints or configs (build), read rank-locally from safetensors (loading)."""

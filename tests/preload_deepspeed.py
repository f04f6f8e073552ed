"""Imported by the fork server of tests.dist_utils only (never by a test): DeepSpeed picks its accelerator when it is
first imported, and on these machines that must be the CPU, as pipeline.train and the workers ask."""
import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # the server's own environment; each rank sets its own

import deepspeed  # noqa: E402,F401

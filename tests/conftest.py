"""Test order for `make test` (two xdist workers, a file per worker at a time, `--no-loadscope-reorder`): the files
that take minutes go first, longest first, so the suite does not end with one worker running a long file while the
other waits. xdist's own reordering (most tests first) put the vLLM and default-pair files last, about three minutes
of one idle worker. The order below: each file's share of the 60 slowest test phases of `pytest --durations=60`
(test_slurm.py about 270 s before its cluster scheduled every second, 160-260 s since; test_vllm.py 175 s,
test_default.py 150 s, test_faults.py 140 s, ...), largest first."""
from __future__ import annotations

import os

SLOWEST_FIRST = ["test_slurm.py", "test_default.py", "test_faults.py", "test_vllm.py", "test_study.py",
                 "test_train.py", "test_onpolicy.py", "test_layout.py", "test_loading.py", "test_cluster_launch.py",
                 "test_errors.py", "test_teacher_cache.py",
                 "test_rollout.py", "test_vocab_parallel.py"]


def pytest_collection_modifyitems(session, config, items):
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    # stable: the tests of a file keep their order; files not listed (seconds each) go last
    items.sort(key=lambda item: rank.get(os.path.basename(str(item.fspath)), len(rank)))

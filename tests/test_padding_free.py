"""Padding-free instruction batches (data.padding_free): a micro-batch's prompt + response examples packed into rows,
each attending only to itself, give the padded batch's losses (float reassociation aside) in real runs at 1 and 2
ranks on both backends, on-policy steps included, and with the teacher cache; and fewer positions go through the
models."""
from __future__ import annotations

import json
import random

import pytest
import torch

from pipeline.data import batches as data
from pipeline.models import build as M
from tests.dist_utils import launch_preloaded
from tests.test_faults import loss_lines, ok
from tests.test_train import ENV, REPO

ONPOLICY = "pipeline/configs/debug_onpolicy.yaml"


@pytest.mark.parametrize("seed", range(6))
def test_packing_keeps_every_example_once_inside_the_width(seed):
    rng = random.Random(seed)
    n = rng.randint(1, 12)
    prompts = [[rng.randint(1, 50) for _ in range(rng.randint(1, 20))] for _ in range(n)]
    responses = [[rng.randint(1, 50) for _ in range(rng.randint(1, 30))] for _ in range(n)]
    width = rng.choice([0, 40, 64])
    b, order = data.collate_packed(prompts, responses, pad_id=0, width=width)
    padded = data.collate([prompts[i] for i in order], [responses[i] for i in order], pad_id=0)
    assert sorted(order) == list(range(n))
    longest = max(len(p) + len(r) for p, r in zip(prompts, responses))
    assert b.tokens.shape[1] in (longest, max(width, longest)) and b.tokens.numel() <= n * longest
    # the same loss targets in the same order: the loss rows of the padded batch over the examples in `order`
    assert torch.equal(b.tokens[:, 1:][b.loss_mask.bool()], padded.tokens[:, 1:][padded.loss_mask.bool()])
    assert int(b.attention_mask.sum()) == sum(len(p) + len(r) for p, r in zip(prompts, responses))
    # each example is a document of its own, positions restart with it
    pos = M.document_positions(b.documents)
    for r in range(b.tokens.shape[0]):
        starts = (pos[r] == 0).nonzero().squeeze(1).tolist()
        assert starts[0] == 0


def _spread(path) -> str:
    """Instruction rows whose lengths spread from a few tokens to the job's longest (as real data does), so that
    examples share rows when packed."""
    rng = random.Random(0)
    words = "the a cat dog sat on mat sun rain sea ship king queen fool".split()
    with open(path, "w") as f:
        for _ in range(48):
            prompt = " ".join(rng.choice(words) for _ in range(rng.randint(1, 5)))
            response = " ".join(rng.choice(words) for _ in range(rng.choice([1, 2, 3, 8])))
            f.write(json.dumps({"prompt": prompt, "response": response}) + "\n")
    return str(path)


def _run(tmp_path, name, backend, nproc, *extra):
    d = tmp_path / name
    ok(launch_preloaded(["--config", ONPOLICY, f"--run_dir={d}", f"--parallel.backend={backend}", "--train.steps=6",
                         f"--data.files=[{_spread(tmp_path / 'spread.jsonl')}]",
                         "--train.eval_every=0", "--data.eval_files=[]", "--checkpoint.every=0",
                         "--checkpoint.export=false", "--logging.progress=false", "--rollout.engine=hf",
                         "--train.log_every=1", *extra], nproc, ENV, REPO, 600))
    return [float(x) for _, x in loss_lines(d)]


def _positions_per_token(run_dir) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    return [e.value for e in acc.Scalars("data/positions_per_token")]


@pytest.mark.parametrize("backend,nproc", [("none", 1), ("deepspeed", 2), ("fsdp2", 2)])
def test_packed_steps_equal_padded_steps(tmp_path, backend, nproc):
    """The on-policy debug job (half of its steps on the student's own generations): every step's loss with packed
    examples equals the padded one's to float reassociation (rel 1e-5; the attention sees the same keys, the loss
    the same rows)."""
    packed = _run(tmp_path, "packed", backend, nproc, "--data.padding_free=true")
    padded = _run(tmp_path, "padded", backend, nproc, "--data.padding_free=false")
    assert len(packed) == 6
    assert packed == pytest.approx(padded, rel=1e-5)
    if backend == "none":  # and the packing did pack: fewer positions per real token on every step, never more
        fewer, more = _positions_per_token(tmp_path / "packed"), _positions_per_token(tmp_path / "padded")
        assert len(fewer) == len(more) == 6 and all(a <= b for a, b in zip(fewer, more))
        assert sum(fewer) < sum(more) and min(fewer) >= 1.0


def test_packed_examples_keep_atkd_per_sequence_scope(tmp_path):
    """ATKD weighs tokens by their sequence's statistics: with packed rows a sequence is still one example (not its
    row), so the losses equal the padded run's."""
    atkd = ["--loss.method=atkd", "--loss.options={}"]
    packed = _run(tmp_path, "packed", "none", 1, "--data.padding_free=true", *atkd)
    padded = _run(tmp_path, "padded", "none", 1, "--data.padding_free=false", *atkd)
    assert packed == pytest.approx(padded, rel=1e-5)

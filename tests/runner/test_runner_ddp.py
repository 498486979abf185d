"""Two gloo processes under torchrun train the same weights as one process with the doubled batch."""

from pathlib import Path

import kit_loop
import pytest
import torch

CHILD = Path(__file__).with_name("ddp_child.py")


def _run(out, batch, accum, nproc=None):
    """``nproc`` processes under torchrun, or this very process when None."""
    return kit_loop.run_child(CHILD, [str(out), str(batch), str(accum)], out, nproc)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """One process, global batch 64."""
    return _run(tmp_path_factory.mktemp("single") / "w.pt", 64, 1)


def test_two_gloo_processes_match_one_process_with_double_batch(tmp_path, single):
    ddp = _run(tmp_path / "w.pt", 64, 1, nproc=2)  # 2 × 32
    # The same images per step; gradients averaged by all-reduce instead of one mean: fp32 rounding only.
    for k, v in single.items():
        torch.testing.assert_close(ddp[k], v, rtol=0, atol=1e-5, msg=k)
    assert max((ddp[k] - v).abs().max().item() for k, v in single.items()) < 1e-5


def test_grad_accumulation_matches_full_batch(tmp_path, single):
    accumulated = _run(tmp_path / "w.pt", 64, 4)  # 4 micro-batches of 16
    for k, v in single.items():
        torch.testing.assert_close(accumulated[k], v, rtol=0, atol=1e-5, msg=k)

"""Two gloo processes under torchrun train the same weights as one process with the doubled batch."""

import os
import runpy
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch

CHILD = Path(__file__).with_name("ddp_child.py")
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _run(out, batch, accum, nproc=None):
    """``nproc`` processes under torchrun, or this very process when None."""
    args = [str(CHILD), str(out), str(batch), str(accum)]
    if nproc is None:
        threads = torch.get_num_threads()
        with mock.patch.object(sys, "argv", args):
            runpy.run_path(str(CHILD), run_name="__main__")
        torch.set_num_threads(threads)
    else:
        launcher = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={nproc}",
        ]
        proc = subprocess.run([*launcher, *args], env=ENV, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(out, weights_only=True)


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

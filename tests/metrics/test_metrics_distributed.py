"""Two gloo processes, each with part of the data: compute() sees what one process with all of it sees."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from latentforge_metrics import PSNR, GaussianStats, inception_score, precision_recall

WORKER = textwrap.dedent(
    """
    import sys
    import numpy as np
    import torch
    import torch.distributed as dist
    from latentforge_metrics import PSNR, InceptionScore, PrecisionRecall
    from latentforge_metrics.stats import GaussianStats

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    gen = torch.Generator().manual_seed(0)
    x, logits = torch.randn(203, 16, generator=gen), torch.randn(203, 1008, generator=gen) * 3
    real, fake = torch.randn(150, 2048, generator=gen), torch.randn(130, 2048, generator=gen) + 0.05
    images = torch.rand(10, 3, 16, 16, generator=gen)
    part = [slice(0, 120), slice(120, None)][rank]  # uneven shares
    stats = GaussianStats()
    stats.update(x[part])
    merged = stats.gathered()
    isc = InceptionScore()
    isc.update_features(logits[part])
    prc = PrecisionRecall(batch_size=64)
    prc.update_features(real[[slice(0, 100), slice(100, None)][rank]], real=True)
    prc.update_features(fake[[slice(0, 30), slice(30, None)][rank]])
    psnr, mine = PSNR(), images[[slice(0, 3), slice(3, None)][rank]]
    psnr.update(mine, mine * 0.9)
    out = dict(n=merged.n, mu=merged.mu, sigma=merged.sigma, isc=isc.compute()["inception_score"],
               psnr=psnr.compute(), **prc.compute())
    if rank == 0:
        np.savez(sys.argv[1], **out)
    dist.destroy_process_group()
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_equal_one(tmp_path):
    script, result = tmp_path / "worker.py", tmp_path / "out.npz"
    script.write_text(WORKER)
    env = dict(
        os.environ,
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(_free_port()),
        WORLD_SIZE="2",
        OMP_NUM_THREADS="1",
    )
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(result)],
            env=dict(env, RANK=str(r)),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for r in range(2)
    ]
    for p in procs:
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0, out.decode()[-3000:]
    got = np.load(result)

    gen = torch.Generator().manual_seed(0)
    x, logits = torch.randn(203, 16, generator=gen), torch.randn(203, 1008, generator=gen) * 3
    real, fake = torch.randn(150, 2048, generator=gen), torch.randn(130, 2048, generator=gen) + 0.05
    images = torch.rand(10, 3, 16, 16, generator=gen)
    one = GaussianStats()
    one.update(x)
    assert int(got["n"]) == 203
    np.testing.assert_allclose(got["mu"], one.mu, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(got["sigma"], one.sigma, rtol=1e-10, atol=1e-14)
    assert float(got["isc"]) == pytest.approx(inception_score(logits)[0], rel=1e-12)
    pr = precision_recall(real, fake)
    assert float(got["precision"]) == pr["precision"] and float(got["recall"]) == pr["recall"]
    psnr = PSNR()
    psnr.update(images, images * 0.9)
    assert float(got["psnr"]) == pytest.approx(psnr.compute(), rel=1e-12)

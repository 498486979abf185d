"""sweep-samplers: one row per sampler and step count, with the NFE each spent and the metric, from the
same starting noise (so the rows differ by the sampler alone)."""

import json

import numpy as np
import pytest
import torch

from latentforge_runner import cli
from latentforge_runner.config import ConfigError
from latentforge_runner.data import Digits


@pytest.fixture(scope="module")
def generator_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gen")
    train = ["training.steps=2", "training.batch_size=8", "training.checkpoint_every=2", "eval.every=0"]
    cli.run_recipe(
        *cli.load_settings(None, "tiny-rae", [*train, "eval.stats_batches=1", f"run.output_dir={out}"])
    )
    digits = Digits("test", 32)
    real = torch.stack([digits[i]["image"] for i in range(40)])
    np.savez(out / "reference.npz", arr_0=(real * 255).round().byte().permute(0, 2, 3, 1).numpy())
    return out


def _sweep(generator_run, out, *extra):
    args = [
        f"generator_run={generator_run}",
        f"reference={generator_run / 'reference.npz'}",
        "num_samples=20",
        "batch_size=10",
        "metric=fd-dinov2",
        "metric_params={encoder: test-vit-tiny, output: pooled}",
        f"run.output_dir={out}",
        *extra,
    ]
    return cli.run_recipe(*cli.load_settings("sweep-samplers", None, args))


@pytest.mark.filterwarnings("ignore:the covariance of")
def test_sweep_tabulates_the_metric_against_nfe(generator_run, tmp_path):
    _sweep(generator_run, tmp_path, "samplers=[euler,heun,dpm++2m,unipc]", "steps=[1,4]")
    rows = json.loads((tmp_path / "sweep.json").read_text())["rows"]
    nfe = {(r["sampler"], r["steps"]): r["nfe"] for r in rows}
    assert nfe == {
        ("euler", 1): 1,
        ("euler", 4): 4,
        ("heun", 1): 2,
        ("heun", 4): 8,
        ("dpm++2m", 1): 1,
        ("dpm++2m", 4): 4,
        ("unipc", 1): 1,
        ("unipc", 4): 4,
    }
    assert {r["grid"] for r in rows} == {"uniform"}
    value = {(r["sampler"], r["steps"]): r["fd-dinov2"] for r in rows}
    assert all(np.isfinite(v) and v > 0 for v in value.values())
    # One step of each is x − v from the same noise for Euler, DPM-Solver++ and UniPC (their first
    # step to t = 0 is x̂0): the same samples, the same metric; four steps differ.
    assert value[("euler", 1)] == value[("dpm++2m", 1)] == value[("unipc", 1)]
    assert len({value[(s, 4)] for s in ("euler", "dpm++2m", "unipc")}) == 3
    table = (tmp_path / "sweep.md").read_text()
    assert "| sampler | NFE 1 | NFE 2 | NFE 4 | NFE 8 |" in table and "| heun |  | " in table


@pytest.mark.filterwarnings("ignore:the covariance of")
def test_sweep_over_time_grids(generator_run, tmp_path):
    """Each sampler on each grid: a few-step grid changes the samples, and is its own table row."""
    _sweep(generator_run, tmp_path, "samplers=[unipc]", "grids=[uniform,logsnr,edm]", "steps=[4]")
    rows = json.loads((tmp_path / "sweep.json").read_text())["rows"]
    assert [(r["grid"], r["nfe"]) for r in rows] == [("uniform", 4), ("logsnr", 4), ("edm", 4)]
    assert len({r["fd-dinov2"] for r in rows}) == 3
    table = (tmp_path / "sweep.md").read_text()
    assert "| unipc (logsnr grid) | " in table and "| unipc (edm grid) | " in table


def test_sweep_bad_input(generator_run, tmp_path):
    with pytest.raises(ConfigError, match="samplers: unknown \\['rk4'\\]"):
        _sweep(generator_run, tmp_path / "a", "samplers=[euler,rk4]")
    with pytest.raises(ConfigError, match="steps"):
        _sweep(generator_run, tmp_path / "b", "steps=[0]")
    with pytest.raises(
        ConfigError, match="grids: unknown \\['karras'\\]; expected some of uniform, logsnr, edm"
    ):
        _sweep(generator_run, tmp_path / "c", "grids=[uniform,karras]")
    with pytest.raises(ConfigError, match="\\['dopri5'\\] choose their own times"):
        _sweep(generator_run, tmp_path / "d", "samplers=[unipc,dopri5]", "grids=[logsnr]")
    with pytest.raises(ConfigError, match="sampler.grid: give the time grids as grids="):
        _sweep(generator_run, tmp_path / "e", "sampler={grid: logsnr}")

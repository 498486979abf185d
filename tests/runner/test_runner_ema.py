"""EMA tooling: several EMA rates in one run, EDM2's power-function EMA and its post-hoc reconstruction,
and scoring checkpoints × EMAs by a Fréchet distance."""

import json

import kit_loop
import numpy as np
import pytest
import torch

from latentforge_core.checkpoint import load_checkpoint
from latentforge_core.errors import InputError
from latentforge_runner import cli, ema
from latentforge_runner.config import ConfigError, SettingError
from latentforge_runner.data import Digits
from latentforge_runner.training import PowerEMA, TrainingSettings, list_checkpoints


# ------------------------------------------------------------------------------------------------
# σ_rel ↔ γ
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sigma_rel", [0.01, 0.05, 0.07, 0.1, 0.2, 0.28])
def test_gamma_solves_edm2s_closed_form(sigma_rel):
    gamma = ema.gamma_of(sigma_rel)
    assert gamma > 0
    # EDM2 eq. 123: σ_rel = sqrt((γ+1) / ((γ+2)² (γ+3))), the relation gamma_of inverts.
    assert np.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3))) == pytest.approx(sigma_rel, rel=1e-10)
    assert ema.sigma_rel_of(gamma) == pytest.approx(sigma_rel, rel=1e-10)


def test_edm2s_two_profiles_have_the_papers_exponents():
    # The paper's Table/figure values for its two tracked profiles.
    assert ema.gamma_of(0.05) == pytest.approx(16.97, abs=0.01)
    assert ema.gamma_of(0.10) == pytest.approx(6.94, abs=0.01)


class OneHot(torch.nn.Module):
    """A "model" whose parameters at step k are the k-th unit vector: an EMA of it is its own response,
    the weight it gives each past step."""

    def __init__(self, steps: int):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(steps, dtype=torch.float64))

    def set_step(self, step: int) -> None:
        with torch.no_grad():
            self.w.zero_()[step - 1] = 1.0


def _responses(sigmas, steps, snapshot_every=None, folder=None):
    model = OneHot(steps)
    tracked = {s: PowerEMA(model, s) for s in sigmas}
    for step in range(1, steps + 1):
        model.set_step(step)
        for profile in tracked.values():
            profile.update(model, step)
        if snapshot_every and step % snapshot_every == 0:
            ema.write_snapshot(folder, step, {s: tracked[s].module for s in (0.05, 0.1)}, {})
    return {s: p.module.w.detach().numpy() for s, p in tracked.items()}


def test_power_ema_weighs_the_past_as_its_sigma_rel_says():
    """The per-step decay (1 − 1/t)^(γ+1) makes the measured width of the response, its std over the
    steps relative to t, the σ_rel asked for (the continuous profile's, to the discretisation)."""
    steps = 2000
    for sigma, response in _responses([0.05, 0.1], steps).items():
        t = np.arange(1, steps + 1)
        assert response.sum() == pytest.approx(1.0, abs=1e-12)
        mean = (response * t).sum()
        assert np.sqrt((response * (t - mean) ** 2).sum()) / steps == pytest.approx(sigma, rel=2e-3)


# ------------------------------------------------------------------------------------------------
# Post-hoc reconstruction
# ------------------------------------------------------------------------------------------------
def test_reconstruction_equals_a_profile_tracked_directly(tmp_path):
    """σ_rel 0.07 rebuilt from snapshots of 0.05 and 0.10 every 10 of 120 steps equals 0.07 tracked
    directly, to 2% in total weight (measured 0.6%): not exactly, because the combination of the
    snapshots' responses is only the least-squares fit of the wanted one, and how close it fits is set
    by the snapshot interval (the error grows with interval / steps)."""
    direct = _responses([0.05, 0.07, 0.1], 120, snapshot_every=10, folder=tmp_path)
    state, config = ema.reconstruct(tmp_path, 0.07)
    assert config == {"step": 120, "sigma_rel": 0.07}
    rebuilt = state["w"].numpy()
    assert np.abs(rebuilt - direct[0.07]).sum() < 0.02
    assert np.abs(rebuilt - direct[0.05]).sum() > 0.2  # a tolerance that tells the widths apart
    # At an earlier snapshot, the response of 0.07 as it was at step 60, from half as many snapshots
    # as wide apart relative to the run so far: 4% (measured 2.2%).
    early = _responses([0.07], 60)[0.07]
    rebuilt = ema.reconstruct(tmp_path, 0.07, at_step=60)[0]["w"].numpy()
    assert np.abs(rebuilt[:60] - early).sum() < 0.04 and np.abs(rebuilt[60:]).max() < 1e-12
    # A tracked width comes back (nearly) as itself.
    assert np.abs(ema.reconstruct(tmp_path, 0.1)[0]["w"].numpy() - direct[0.1]).sum() < 1e-6


def _regression(run_dir, steps, **training):
    torch.manual_seed(0)
    x = torch.randn(256, 8)
    y = x @ torch.randn(8, 1) + 0.3 * torch.randn(256, 1)
    t = TrainingSettings(steps=steps, batch_size=16, lr=3e-2, log_every=1000, **training)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    state, entry = kit_loop.build(model, t, lambda idx: {"x": x[idx], "y": y[idx]}, 256, run_dir)
    return state, entry


def _mse(model, batch):
    return torch.nn.functional.mse_loss(model(batch["x"]), batch["y"])


def test_reconstruction_of_a_training_run_equals_its_tracked_profile(tmp_path):
    """The same in weight space, through the training kit: the post-hoc σ_rel 0.07 lies within 1% of
    the distance between the two tracked profiles from 0.07 tracked directly (measured 0.16%)."""
    state, entry = _regression(
        tmp_path, 120, ema_profiles=(0.05, 0.1), ema_snapshot_every=10, checkpoint_every=1000
    )
    direct = PowerEMA(state.model, 0.07)
    kit_loop.fit(state, entry, _mse, on_step=lambda s: direct.update(s.model, s.step))
    assert [step for step, _ in ema.list_snapshots(tmp_path / "ema_snapshots")] == list(range(10, 121, 10))
    rebuilt, config = ema.reconstruct(tmp_path / "ema_snapshots", 0.07)
    assert config["step"] == 120 and config["sigma_rel"] == 0.07

    def flat(sd):
        return torch.cat([sd[k].flatten() for k in sorted(sd)])

    wanted = flat(direct.module.state_dict())
    span = (
        flat(state.profiles[0.05].module.state_dict()) - flat(state.profiles[0.1].module.state_dict())
    ).norm()
    assert span > 1e-3  # the profiles differ: the run moved its weights
    assert (flat(rebuilt) - wanted).norm() < 0.01 * span


def test_several_emas_resume_bitwise(tmp_path):
    """Two extra rates and two power profiles, saved in every checkpoint and snapshotted: a run stopped
    after its step-6 checkpoint (one step past it) and resumed ends bitwise as an unbroken run; the
    rotation that keeps one checkpoint leaves every snapshot."""
    emas = dict(
        ema_decay=0.9,
        ema_decays=(0.5, 0.99),
        ema_profiles=(0.05, 0.1),
        ema_snapshot_every=4,
        keep_checkpoints=1,
    )
    whole, entry = _regression(tmp_path / "whole", 12, checkpoint_every=6, **emas)
    kit_loop.fit(whole, entry, _mse)

    def stop_at_7(s):
        if s.step == 7:
            raise KeyboardInterrupt

    broken, entry = _regression(tmp_path / "broken", 12, checkpoint_every=6, **emas)
    with pytest.raises(KeyboardInterrupt):
        kit_loop.fit(broken, entry, _mse, on_step=stop_at_7)
    resumed, entry = _regression(tmp_path / "broken", 12, checkpoint_every=6, **emas)
    assert resumed.resume() and resumed.step == 6
    kit_loop.fit(resumed, entry, _mse)

    a, b = (
        list_checkpoints(tmp_path / "whole/checkpoints")[-1],
        list_checkpoints(tmp_path / "broken/checkpoints")[-1],
    )
    names = sorted(p.name for p in a.glob("*.safetensors"))
    assert names == [
        "ema.safetensors",
        "ema_0.5.safetensors",
        "ema_0.99.safetensors",
        "ema_sigma_0.05.safetensors",
        "ema_sigma_0.1.safetensors",
        "model.safetensors",
    ]
    for name in names:
        sa, sb = load_checkpoint(a / name)[0], load_checkpoint(b / name)[0]
        assert all(torch.equal(sa[k], sb[k]) for k in sa), name
    assert not torch.equal(
        load_checkpoint(a / "ema_0.5.safetensors")[0]["0.weight"],
        load_checkpoint(a / "ema_0.99.safetensors")[0]["0.weight"],
    )
    assert [p.name for p in list_checkpoints(tmp_path / "whole/checkpoints")] == ["00000012"]
    for step in (4, 8, 12):
        sa = load_checkpoint(tmp_path / f"whole/ema_snapshots/{step:08d}.safetensors")[0]
        sb = load_checkpoint(tmp_path / f"broken/ema_snapshots/{step:08d}.safetensors")[0]
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ------------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------------
def test_bad_input(tmp_path):
    for sigma in (0.0, -0.1, 0.3):
        with pytest.raises(InputError, match="sigma_rel .* out of range: expected 0 < sigma_rel < 0.2887"):
            ema.gamma_of(sigma)
    with pytest.raises(InputError, match="holds no EMA snapshots"):
        ema.reconstruct(tmp_path, 0.07)
    _responses([0.05, 0.1], 20, snapshot_every=10, folder=tmp_path)
    with pytest.raises(InputError, match="at_step 15: no snapshot at that step .* expected one of 10, 20"):
        ema.reconstruct(tmp_path, 0.07, at_step=15)
    with pytest.raises(InputError, match="out of range"):
        ema.reconstruct(tmp_path, 0.5)
    with pytest.raises(SettingError, match=r"ema_profiles\[0\]: expected a value in \(0, 0.288675\)"):
        TrainingSettings(ema_profiles=(0.3,))
    with pytest.raises(SettingError, match="ema_decays .* names a value twice"):
        TrainingSettings(ema_decays=(0.9, 0.9))
    with pytest.raises(SettingError, match="ema_snapshot_every .* ema_profiles is empty"):
        TrainingSettings(ema_snapshot_every=10)


# ------------------------------------------------------------------------------------------------
# Recipes on a tiny generator run: posthoc-ema, sample's weight choice, score-checkpoints
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def generator_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gen")
    train = [
        "training.steps=4",
        "training.batch_size=8",
        "training.lr=3e-3",
        "training.checkpoint_every=2",
        "training.ema_decay=0.5",
        "training.ema_decays=[0.9]",
        "training.ema_profiles=[0.05,0.1]",
        "training.ema_snapshot_every=1",
        "eval.every=0",
        "eval.stats_batches=1",
        "eval.sampler={sampler: euler, steps: 2}",
    ]
    cli.run_recipe(*cli.load_settings(None, "tiny-rae", [*train, f"run.output_dir={out}"]))
    digits = Digits("test", 32)
    real = torch.stack([digits[i]["image"] for i in range(40)])
    np.savez(out / "reference.npz", arr_0=(real * 255).round().byte().permute(0, 2, 3, 1).numpy())
    return out


def _recipe(name, *args):
    return cli.run_recipe(*cli.load_settings(name, None, list(args)))


def _sample(run, out, *extra):
    _recipe(
        "sample",
        f"generator_run={run}",
        "num_samples=20",
        "batch_size=10",
        "write_png=false",
        f"run.output_dir={out}",
        *extra,
    )
    return np.load(out / "samples.npz")["arr_0"]


def test_posthoc_ema_writes_weights_sample_reads(generator_run, tmp_path):
    _recipe(
        "posthoc-ema",
        f"generator_run={generator_run}",
        "sigma_rel=[0.07]",
        f"run.output_dir={tmp_path / 'p'}",
    )
    sd, config = load_checkpoint(generator_run / "posthoc/ema_sigma_0.07.safetensors")
    assert config["step"] == 4 and config["sigma_rel"] == 0.07 and config["name"]
    expected = ema.reconstruct(generator_run / "ema_snapshots", 0.07)[0]
    assert all(torch.equal(sd[k], expected[k]) for k in expected)
    posthoc = _sample(
        generator_run, tmp_path / "a", f"checkpoint={generator_run / 'posthoc'}", "weights=ema_sigma_0.07"
    )
    tracked = _sample(generator_run, tmp_path / "b", "weights=ema_0.9")
    ema_ = _sample(generator_run, tmp_path / "c")
    assert not np.array_equal(posthoc, tracked) and not np.array_equal(tracked, ema_)
    with pytest.raises(
        ConfigError,
        match="weights=ema_0.999: .* no ema_0.999 weights .* expected one of ema, ema_0.9, ema_sigma",
    ):
        _sample(generator_run, tmp_path / "d", "weights=ema_0.999")


@pytest.mark.filterwarnings("ignore:the covariance of")
def test_score_checkpoints_finds_the_weights_that_made_the_reference(generator_run, tmp_path):
    """The reference is ``sample``'s own images of step 2's ema_0.9: that row draws the very same images
    (the same noise and labels), so its distance is ~0 and it must come out best of 2 steps × 3 EMAs."""
    step2 = list_checkpoints(generator_run / "checkpoints")[0]
    reference = tmp_path / "reference"
    _sample(generator_run, reference, f"checkpoint={step2}", "weights=ema_0.9")
    _recipe(
        "score-checkpoints",
        f"generator_run={generator_run}",
        f"reference={reference / 'samples.npz'}",
        "weights=[ema,ema_0.9]",
        "posthoc=[0.07]",
        "num_samples=20",
        "batch_size=10",
        "metric=fd-dinov2",
        "metric_params={encoder: test-vit-tiny, output: pooled}",
        f"run.output_dir={tmp_path / 'scores'}",
    )
    scores = json.loads((tmp_path / "scores/scores.json").read_text())
    rows = {(r["step"], r["weights"]): r["fd-dinov2"] for r in scores["rows"]}
    assert set(rows) == {(s, w) for s in (2, 4) for w in ("ema", "ema_0.9", "posthoc/ema_sigma_0.07")}
    assert scores["best"]["step"] == 2 and scores["best"]["weights"] == "ema_0.9"
    # The same images: zero to rounding (measured 1e-15); the others' nearest, 2 steps later: 1e-3.
    assert abs(rows[(2, "ema_0.9")]) < 1e-9 < 1e-6 < min(v for k, v in rows.items() if k != (2, "ema_0.9"))
    table = (tmp_path / "scores/scores.md").read_text()
    assert "| weights | step 2 | step 4 |" in table and "| ema_0.9 | **" in table
    assert "best: step 2, ema_0.9" in table


def test_score_checkpoints_bad_input(generator_run, tmp_path):
    common = [
        f"generator_run={generator_run}",
        f"reference={generator_run / 'reference.npz'}",
        "num_samples=20",
        "batch_size=10",
        "metric_params={encoder: test-vit-tiny, output: pooled}",
    ]
    with pytest.raises(ConfigError, match="weights=ema_0.5: .* holds no ema_0.5 weights"):
        _recipe("score-checkpoints", *common, "weights=[ema_0.5]", f"run.output_dir={tmp_path / 'a'}")
    with pytest.raises(ConfigError, match="steps: .* holds no checkpoint of step 3; expected some of 2, 4"):
        _recipe("score-checkpoints", *common, "steps=[3]", f"run.output_dir={tmp_path / 'b'}")
    with pytest.raises(ConfigError, match="weights: expected model, ema, .* got 'best'"):
        _recipe("score-checkpoints", *common, "weights=[ema,best]", f"run.output_dir={tmp_path / 'd'}")
    with pytest.raises(ConfigError, match=r"posthoc\[0\]: expected a value in \(0, 0.288675\)"):
        _recipe("score-checkpoints", *common, "posthoc=[0.5]", f"run.output_dir={tmp_path / 'c'}")

"""The shipped configs carry the official protocols' settings (each value's source is named in the
config's comments); these are the settings the official code uses and ours once differed from."""

import pytest

from latentforge_runner import cli


def _settings(name):
    return cli.load_settings(None, name, [])[1]


def test_rae_samples_with_50_grid_points_in_fp32():
    """RAE's `num_steps: 50` counts grid points: 49 Euler steps (ours at 50 differed by 5e-4); RAE
    samples without autocast."""
    sampler = _settings("rae-ditdh-xl").eval.sampler
    assert sampler["sampler"] == "euler" and sampler["steps"] == 49 and sampler["amp"] is False


def test_digit_class_conditional_top_k_is_300():
    """DiGIT's class-conditional stage-1 script samples with top-k 300 (200 is the unconditional one)."""
    assert _settings("digit-base-gpt").eval.sampler["top_k"] == 300


@pytest.mark.parametrize("name, batch", [("digit-base-stage2", 512)])
def test_digit_stage2_batch_is_the_official_configs(name, batch):
    """DiGIT's stage-2 config: 128 per GPU on 4 GPUs."""
    assert _settings(name).training.batch_size == batch


def test_rae_trains_1400_epochs_with_the_decay_ending_at_epoch_800():
    """RAE stage 2: lr held at 2e-4 for 40 warm-up epochs (not from zero), linear to 2e-5 at epoch 800,
    constant to epoch 1400 (its config's `epochs: 1400`, `decay_end_epoch: 800`)."""
    from latentforge_runner.training import lr_lambda

    t = _settings("rae-ditdh-xl").training
    per_epoch = 1_281_167 // t.batch_size  # the sampler drops the last incomplete batch
    assert (t.steps, t.decay_end, t.warmup_steps) == (1400 * per_epoch, 800 * per_epoch, 40 * per_epoch)
    lr = lambda step: t.lr * lr_lambda(t)(step)  # noqa: E731
    assert lr(0) == lr(t.warmup_steps - 1) == pytest.approx(2e-4)
    halfway = (t.warmup_steps + t.decay_end) // 2
    assert lr(halfway) == pytest.approx(
        2e-4 + (2e-5 - 2e-4) * (halfway - t.warmup_steps) / (t.decay_end - t.warmup_steps)
    )
    assert lr(t.decay_end) == lr(t.steps - 1) == pytest.approx(2e-5)

"""The command line explains itself: one catch turns every LatentforgeError into ``latentforge: error:
…`` (exit 2, no traceback; ``--debug`` re-raises), settings are range-checked at parse time naming
the dotted key, sampler options are checked by ``validate``, ``run RECIPE --help`` lists every key,
``cp`` copies a shipped config, ``ls configs`` shows where each lives, ``ls`` warns of clashes."""

from __future__ import annotations

import textwrap
from pathlib import Path

import attrs
import pytest
import torch
import yaml

from latentforge_core import registry
from latentforge_core.errors import LatentforgeError, RunInterrupted
from latentforge_runner import cli
from latentforge_runner.config import ConfigError, SettingError, Settings, settings, settings_help
from latentforge_runner.training import TrainingSettings


def fails(capsys, argv, *words, code=2):
    """Run ``latentforge argv`` in-process: exit ``code``, one error line holding ``words``, no traceback."""
    assert cli.main(list(argv)) == code
    out, err = capsys.readouterr()
    assert "Traceback" not in err and "Traceback" not in out
    assert err.startswith("latentforge: error:"), err
    assert err.count("latentforge: error:") == 1
    for word in words:
        assert word in err, f"{word!r} not in {err!r}"
    return err


# ------------------------------------------------------------------------------------------------
# Settings: every value's range, named by its dotted key, at parse time
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "override, words",
    [
        ("training.lr=-1", ("training.lr", "> 0", "-1")),
        ("training.lr=0", ("training.lr", "> 0")),
        ("training.final_lr=-1e-5", ("training.final_lr", "≥ 0")),
        ("training.betas=[0.9, 1.0]", ("training.betas[1]", "in [0, 1)")),
        ("training.betas=[-0.1, 0.9]", ("training.betas[0]", "in [0, 1)")),
        ("training.eps=0", ("training.eps", "> 0")),
        ("training.weight_decay=-0.1", ("training.weight_decay", "≥ 0")),
        ("training.grad_clip=0", ("training.grad_clip", "> 0")),
        ("training.warmup_steps=-1", ("training.warmup_steps", "≥ 0")),
        ("training.num_workers=-2", ("training.num_workers", "≥ 0")),
        ("training.steps=0", ("training.steps", "≥ 1")),
        ("training.ema_decay=1.0", ("training.ema_decay", "in [0, 1)")),
        ("training.seed=-1", ("training.seed", "in [0, 4294967296)")),
        ("training.batch_size=30", ("training.batch_size", "not divisible by grad_accum 4", "e.g. 28")),
        ("eval.every=-1", ("eval.every", "≥ 0")),
        ("eval.num_samples=0", ("eval.num_samples", "≥ 1")),
        ("eval.fid_batch_size=0", ("eval.fid_batch_size", "≥ 1")),
        ("eval.fid_samples=10", ("eval.fid_samples", "needs eval.fid_reference")),
        ("data.image_size=0", ("data.image_size", "≥ 1")),
        ("data.num_classes=0", ("data.num_classes", "≥ 1")),
        ("data.resize=16", ("data.resize", "smaller than image_size 32")),
        ("run.threads=0", ("run.threads", "≥ 1", "got 0")),
        ("run.seed=-3", ("run.seed",)),
        ("run.device=gpu", ("run.device", "auto, cpu, cuda or cuda:N", "'gpu'")),
        ("run.output_dir=''", ("run.output_dir", "non-empty")),
    ],
)
def test_settings_ranges_name_the_dotted_key(capsys, override, words):
    extra = ["training.grad_accum=4"] if override.startswith("training.batch_size") else []
    for command in ("validate", "run"):  # the same arguments, the same error
        fails(capsys, [command, "train-generator", "--config", "tiny-rae", override, *extra], *words)


def test_nested_training_blocks_get_their_own_key(capsys):
    fails(capsys, ["validate", "demo", "generator_training.lr=-1"], "generator_training.lr", "> 0")
    fails(capsys, ["validate", "demo", "evaluator.training.eps=0"], "evaluator.training.eps", "> 0")
    fails(capsys, ["validate", "demo", "decoder.noise_tau=-1"], "decoder.noise_tau", "≥ 0")


def test_recipe_settings_ranges(capsys, tmp_path):
    fails(
        capsys,
        ["validate", "fit-kmeans", "--config", "tiny-digit-kmeans", "batch_size=0"],
        "batch_size",
        "≥ 1",
    )
    fails(capsys, ["validate", "pack", f"root={tmp_path}", "max_images=0"], "max_images", "≥ 1")
    fails(capsys, ["validate", "evaluate", "samples=x.npz", "batch_size=-1"], "batch_size", "≥ 1")
    fails(
        capsys,
        ["validate", "train-tokenizer", "--config", "tiny-train-vqgan", "loss.discriminator.ndf=0"],
        "loss.discriminator.ndf",
        "≥ 1",
    )


def test_settings_made_in_code_are_checked_too():
    with pytest.raises(SettingError, match=r"^lr: expected a value > 0, got -1"):
        TrainingSettings(lr=-1)
    with pytest.raises(ConfigError, match="betas"):
        attrs.evolve(TrainingSettings(), betas=(0.9, 2.0))
    assert isinstance(SettingError("x", "y"), (LatentforgeError, ValueError))


# ------------------------------------------------------------------------------------------------
# YAML read at the boundary: a parse error names the override or the file
# ------------------------------------------------------------------------------------------------
def test_yaml_errors_name_the_override_or_the_file(capsys, tmp_path):
    fails(capsys, ["validate", "tiny-rae", "training.steps=[1,"], "override 'training.steps=[1,'", "YAML")
    fails(capsys, ["validate", "tiny-rae", "eval.sampler={steps: 2"], "eval.sampler", "YAML")
    bad = tmp_path / "bad.yaml"
    bad.write_text("recipe: train-generator\ntraining: {steps: [1,\n")
    err = fails(capsys, ["validate", str(bad)], str(bad), "not valid YAML", "line")
    assert len(err.strip().splitlines()) <= 2  # the message and at most one "caused by" line
    (tmp_path / "folder.yaml").mkdir()
    fails(capsys, ["validate", str(tmp_path / "folder.yaml")], "folder")


def test_caused_by_line_when_the_cause_adds_something(capsys, monkeypatch):
    def boom(args):
        try:
            raise OSError("disk on fire")
        except OSError as err:
            raise ConfigError("could not read the thing") from err

    monkeypatch.setattr(cli, "cmd_ls", boom)
    assert cli.main(["ls"]) == 2
    err = capsys.readouterr().err
    assert err == "latentforge: error: could not read the thing\n  caused by: OSError: disk on fire\n"


def test_debug_reraises(monkeypatch):
    monkeypatch.setattr(cli, "cmd_ls", lambda args: (_ for _ in ()).throw(ConfigError("nope")))
    with pytest.raises(ConfigError, match="nope"):
        cli.main(["--debug", "ls"])


# ------------------------------------------------------------------------------------------------
# Sampler and guidance options: checked by validate without building a model
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "override, words",
    [
        ("eval.sampler.sampler=rk4", ("eval.sampler.sampler", "'euler'", "'rk4'")),
        ("eval.sampler.steps=0", ("eval.sampler.steps", "≥ 1", "got 0")),
        ("eval.sampler.cfg_scale=-1", ("eval.sampler.cfg_scale", "≥ 0")),
        ("eval.sampler.cfg_interval=[0.2, 1.5]", ("eval.sampler.cfg_interval[1]", "[0, 1]")),
        ("eval.sampler.cfg_channels=0", ("eval.sampler.cfg_channels", "≥ 1")),
        ("eval.sampler.cfg_sale=2", ("unknown option 'eval.sampler.cfg_sale'", "cfg_scale")),
        ("eval.sampler.rtol=1e-3", ("eval.sampler.rtol", "dopri5")),
        ("eval.sampler.y=1", ("eval.sampler.y", "given by the recipe")),
    ],
)
def test_validate_checks_sampler_options(capsys, override, words):
    fails(capsys, ["validate", "tiny-rae", override], *words)


def test_validate_checks_token_sampler_options(capsys):
    fails(capsys, ["validate", "tiny-digit-gpt", "eval.sampler.steps=4"], "eval.sampler.steps", "top_k")
    fails(capsys, ["validate", "tiny-digit-stage2", "eval.sampler.top_p=1.5"], "eval.sampler.top_p", "(0, 1]")
    fails(capsys, ["validate", "demo", "evaluator.sampler.steps=0"], "evaluator.sampler.steps")


def test_sample_blocks_are_checked_against_the_run_they_sample(capsys, tmp_path):
    run = tmp_path / "gen"
    run.mkdir()
    (run / "config.yaml").write_text(
        yaml.safe_dump({"recipe": "train-tokens", "generator": {"name": "test-gpt"}})
    )
    base = ["validate", "sample", f"generator_run={run}"]
    fails(capsys, [*base, "sampler.steps=3"], "sampler.steps", "temperature")
    fails(capsys, [*base, "sampler.cfg_scale=-2"], "sampler.cfg_scale", "≥ 0")
    assert cli.main([*base, "sampler.top_k=5"]) == 0
    assert "sampler: sample() options of test-gpt" in capsys.readouterr().out
    # Without the run folder the values of known options are still checked.
    fails(capsys, ["validate", "sample", "generator_run=nowhere", "sampler.steps=0"], "sampler.steps")


# ------------------------------------------------------------------------------------------------
# Errors where the run starts: device, output folder; cleanup never hides the first error
# ------------------------------------------------------------------------------------------------
@pytest.mark.skipif(torch.cuda.is_available(), reason="run.device=cuda is valid here")
def test_cuda_without_cuda_is_a_config_error(capsys, tmp_path):
    err = fails(
        capsys,
        [
            "run",
            "fit-kmeans",
            "--config",
            "tiny-digit-kmeans",
            "run.device=cuda",
            f"run.output_dir={tmp_path}",
        ],
        "run.device 'cuda'",
        "CUDA is not available",
    )
    assert "AttributeError" not in err and "caused by" not in err


def test_output_dir_that_is_a_file_or_under_one(capsys, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    for out in (blocker, blocker / "run"):
        err = fails(
            capsys,
            ["run", "fit-kmeans", "--config", "tiny-digit-kmeans", f"run.output_dir={out}"],
            "run.output_dir",
            f"{blocker} is a file",
        )
        assert "AttributeError" not in err


@settings
class _NoSettings(Settings):
    fail: str = "setup"  # where the fake recipe fails


class _Fragile:
    """A recipe whose setup (or run) fails before it made what its cleanup closes."""

    Settings = _NoSettings

    def __init__(self, config):
        self.cfg = config

    def setup(self):
        if self.cfg.fail == "setup":
            raise ConfigError("setup went wrong: expected something else")
        if self.cfg.fail == "interrupt":
            raise KeyboardInterrupt
        if self.cfg.fail == "sigterm":
            raise RunInterrupted("stopped by SIGTERM at step 3; rerun to resume", exit_code=143)
        self.logger = object()

    def run(self):
        return {}

    def save(self):
        pass

    def cleanup(self):
        self.logger.close()  # AttributeError when setup failed


def test_a_failing_setup_is_not_hidden_by_cleanup(capsys):
    with registry.recipes.override("fragile-test", _Fragile):
        err = fails(capsys, ["run", "fragile-test"], "setup went wrong")
        assert "AttributeError" not in err
        with pytest.raises(ConfigError) as info:
            cli.run_recipe("fragile-test", _NoSettings())
        assert any("cleanup after this error failed too" in n for n in getattr(info.value, "__notes__", []))


def test_interrupts(capsys):
    with registry.recipes.override("fragile-test", _Fragile):
        assert cli.main(["run", "fragile-test", "fail=interrupt"]) == 130
        assert capsys.readouterr().err == "latentforge: interrupted\n"
        assert cli.main(["run", "fragile-test", "fail=sigterm"]) == 143
        err = capsys.readouterr().err
        assert "stopped by SIGTERM" in err and "Traceback" not in err


# ------------------------------------------------------------------------------------------------
# run and validate take the same arguments
# ------------------------------------------------------------------------------------------------
def test_run_and_validate_forms(capsys):
    for argv in (
        ["validate", "tiny-rae"],  # a config naming its recipe
        ["validate", "train-generator", "--config", "tiny-rae"],
        ["validate", "--config", "tiny-rae", "training.steps=3"],
        ["validate", "tiny-rae", "--recipe", "train-generator"],
        ["validate", "demo"],  # a recipe with its own default config
    ):
        assert cli.main(argv) == 0, argv
        assert "valid config for recipe" in capsys.readouterr().out
    fails(
        capsys,
        ["validate", "train-generatr", "--config", "tiny-rae"],
        "not a registered recipe",
        "train-generator",
    )
    fails(capsys, ["run", "trian-generator"], "neither a registered recipe nor a config", "train-generator")
    fails(capsys, ["run"], "name a recipe or a config")
    fails(capsys, ["validate"], "name a recipe or a config")


# ------------------------------------------------------------------------------------------------
# A CLI that explains itself
# ------------------------------------------------------------------------------------------------
def test_run_recipe_help_lists_every_key(capsys):
    for command in ("run", "validate"):
        assert cli.main([command, "train-generator", "--help"]) == 0
        out = capsys.readouterr().out
        assert out.startswith(f"usage: latentforge {command} train-generator")
        lines = {line.split()[0]: line for line in out.splitlines() if line.startswith("  ")}
        for key in (
            "run.threads",
            "data.resize",
            "training.lr",
            "training.betas",
            "eval.sampler",
            "generator.name",
        ):
            assert key in lines, key
        assert "float = 0.0002" in lines["training.lr"] and "learning rate" in lines["training.lr"]
        assert "[> 0]" in lines["training.lr"]
        assert "(required)" in lines["generator.name"]
    assert cli.main(["run", "--config", "tiny-rae", "--help"]) == 0  # the recipe the config names
    assert "training.lr" in capsys.readouterr().out


@pytest.mark.parametrize("recipe", registry.recipes.names())
def test_every_settings_key_has_a_type_a_default_and_help(recipe):
    rows = settings_help(registry.recipes.get(recipe).Settings)
    assert rows
    for row in rows:
        assert row.type and row.default, row
        assert row.help, f"{recipe}: {row.key} has no help: add a trailing # comment to its field"


def test_cp_copies_a_shipped_config(capsys, tmp_path):
    dest = tmp_path / "mine.yaml"
    assert cli.main(["cp", "tiny-rae", str(dest)]) == 0
    assert dest.read_text() == cli.shipped_configs()["tiny-rae"].read_text()
    assert "copied tiny-rae" in capsys.readouterr().out
    dest.write_text("edited")
    fails(capsys, ["cp", "tiny-rae", str(dest)], str(dest), "--force")
    assert dest.read_text() == "edited"
    assert cli.main(["cp", "tiny-rae", str(dest), "--force"]) == 0
    assert dest.read_text() != "edited"
    assert cli.main(["cp", "demo.yaml", str(tmp_path)]) == 0  # into a folder, under its own name
    assert (tmp_path / "demo.yaml").is_file()
    capsys.readouterr()
    fails(capsys, ["cp", "tiny-ra", str(tmp_path / "x.yaml")], "not a shipped config", "tiny-rae")
    fails(capsys, ["cp", "tiny-rae", str(tmp_path / "no" / "x.yaml")], "does not exist")
    assert cli.main(["validate", str(dest)]) == 0  # the copy runs as the original


def test_ls_configs_shows_where_each_lives(capsys):
    assert cli.main(["ls", "configs"]) == 0
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if line.startswith("tiny-rae "))
    assert "train-generator" in line and line.endswith(str(cli.shipped_configs()["tiny-rae"]))


def test_ls_warns_when_two_plugins_claim_a_name(capsys, tmp_path, monkeypatch):
    group = "latentforge.clitestkind"
    for dist in ("acme-gears", "bolt-gears"):
        info = tmp_path / f"{dist.replace('-', '_')}-1.0.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
        (info / "entry_points.txt").write_text(textwrap.dedent(f"[{group}]\ngear = lfcli_{dist[:4]}:make\n"))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv(registry.DISABLE_AUTOLOAD_ENV, raising=False)
    monkeypatch.setattr(registry, "REGISTRIES", {"gears": registry.Registry(group, "gear")})
    assert cli.main(["ls"]) == 0
    out, err = capsys.readouterr()
    assert "gears (2)" in out
    assert err.startswith("latentforge: warning: gear name 'gear' is ambiguous")
    assert "acme-gears 1.0" in err and "'bolt-gears/gear'" in err


def test_main_returns_the_usage_error_code(capsys):
    assert cli.main(["frobnicate"]) == 2
    assert "invalid choice" in capsys.readouterr().err
    assert cli.main(["--help"]) == 0
    assert Path(cli.__file__).name == "cli.py"


def test_override_keys_and_injected_parameters(capsys, tmp_path):
    for bad in ("training..steps=1", ".training.steps=1", "training.steps.=1"):
        fails(capsys, ["validate", "tiny-rae", bad], bad.split("=")[0], "empty part", "key.sub=value")
    fails(
        capsys,
        ["validate", "tiny-rae", "generator.params.input_size=16"],
        "generator.params.input_size",
        "injected by the recipe",
    )
    fails(capsys, ["validate", "tiny-rae", "generator.params.depth=3"], "depth", "fixed by the named size")
    fails(capsys, ["validate", "tiny-rae", "generator.params.dept=3"], "'dept'", "Did you mean 'depth'")
    blocker = tmp_path / "notes.txt"
    blocker.write_text("x")
    fails(capsys, ["cp", "tiny-rae", str(blocker / "x.yaml")], f"{blocker} is a file")

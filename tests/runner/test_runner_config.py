"""Configs and CLI: every shipped config validates (names resolve, parameters bind, nothing built);
bad configs fail with the key, what was wrong and what was expected."""

import pytest
import yaml

from latentforge_runner import cli
from latentforge_runner.config import ConfigError, apply_overrides, load_yaml, validate
from latentforge_runner.recipes.demo import DemoSettings
from latentforge_runner.recipes.train_generator import TrainGeneratorSettings

SHIPPED = sorted(cli.shipped_configs())


def test_the_three_seed_pipelines_and_tiny_versions_are_shipped():
    for name in (
        "rae-ditdh-xl",
        "vavae-lightningdit-xl",
        "digit-base-gpt",
        "tiny-rae",
        "tiny-vavae-lightningdit",
        "tiny-digit-gpt",
        "demo",
    ):
        assert name in SHIPPED


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_config_validates(name):
    recipe, cfg = cli.load_settings(None, name)
    checked = validate(cfg)
    assert checked and all(":" in line for line in checked)
    assert type(cfg).from_dict(cfg.to_dict()) == cfg  # round trip


def test_demo_yaml_is_the_demo_default():
    data = load_yaml(cli.shipped_configs()["demo"])
    assert data.pop("recipe") == "demo"
    assert DemoSettings.from_dict(data) == DemoSettings()


def _tiny():
    return load_yaml(cli.shipped_configs()["tiny-rae"])


def _parse(data):
    data = dict(data)
    data.pop("recipe", None)
    return TrainGeneratorSettings.from_dict(data)


def test_overrides_parse_as_yaml_values():
    data = apply_overrides(
        _tiny(),
        [
            "training.lr=3e-4",
            "training.betas=[0.9, 0.99]",
            "generator.params.depth=3",
            "run.wandb_project=null",
        ],
    )
    cfg = _parse(data)
    assert cfg.training.lr == 3e-4 and cfg.training.betas == (0.9, 0.99)
    assert cfg.generator.params == {"depth": 3} and cfg.run.wandb_project is None
    with pytest.raises(ConfigError, match="key.sub=value"):
        apply_overrides({}, ["training.lr"])
    with pytest.raises(ConfigError, match="training.lr is a value, not a block"):
        apply_overrides({"training": {"lr": 1}}, ["training.lr.x=2"])


@pytest.mark.parametrize(
    "override, message",
    [
        ("training.stepz=10", r"unknown key 'training.stepz'. Did you mean 'steps'"),
        ("trainig.steps=10", r"unknown key 'trainig'. Did you mean 'training'"),
        ("training.steps=ten", r"training.steps: expected an integer, got str 'ten'"),
        ("training.lr=true", r"training.lr: expected a number, got bool"),
        ("training.schedule=cosin", r"expected one of 'constant', 'linear', 'cosine'.*did you mean 'cosine'"),
        ("training.betas=[0.9]", r"training.betas: expected 2 items"),
        ("training.batch_size=30", r"batch_size 30 is not divisible by grad_accum"),
        ("data.name=imagenet", r"data.name: expected one of 'digits', 'folder'"),
    ],
)
def test_bad_values_name_the_key_and_the_expectation(override, message):
    if override.startswith("training.batch_size"):
        override_list = [override, "training.grad_accum=4"]
    else:
        override_list = [override]
    with pytest.raises(ConfigError, match=message):
        _parse(apply_overrides(_tiny(), override_list))


def test_missing_required_key():
    data = _tiny()
    del data["generator"]["name"]
    with pytest.raises(ConfigError, match=r"missing required key 'generator.name'"):
        _parse(data)


def test_unknown_registry_name_gets_suggestions():
    cfg = _parse(apply_overrides(_tiny(), ["generator.name=test-ditd"]))
    with pytest.raises(
        ConfigError, match=r"generator.name: unknown generator 'test-ditd'. Did you mean 'test-ditdh'"
    ):
        validate(cfg)


def test_parameters_that_do_not_bind_are_caught_without_building():
    # A builder with a plain signature: the name is checked against it.
    cfg = _parse(apply_overrides(_tiny(), ["tokenizer.name=kmeans", "tokenizer.params.n_clusterz=8"]))
    with pytest.raises(ConfigError, match=r"does not accept these parameters.*n_clusterz"):
        validate(cfg)
    # A builder taking **kwargs: the parameters travel to the backbone class, built on the meta device.
    cfg = _parse(apply_overrides(_tiny(), ["generator.params.dept=3"]))
    with pytest.raises(
        ConfigError, match=r"tokenizer|generator.params: generator 'test-ditdh' does not accept.*dept"
    ):
        validate(cfg)
    # The published XL sizes validate in seconds because nothing is allocated.
    cfg = _parse(load_yaml(cli.shipped_configs()["rae-ditdh-xl"]))
    assert "generator: generator ditdh-xl" in validate(cfg)


def test_cli_validate_ls_and_errors(capsys):
    assert cli.main(["validate", "tiny-rae"]) == 0
    assert "valid config for recipe 'train-generator'" in capsys.readouterr().out
    assert cli.main(["validate", "tiny-rae", "generator.name=test-ditd"]) == 2
    assert "Did you mean 'test-ditdh'" in capsys.readouterr().err
    assert cli.main(["validate", "tiny-ra"]) == 2
    assert "Did you mean 'tiny-rae'" in capsys.readouterr().err
    assert cli.main(["run", "demo", "--config", "tiny-rae"]) == 2
    assert "for recipe 'train-generator', but recipe 'demo'" in capsys.readouterr().err
    assert cli.main(["ls", "recipes"]) == 0
    out = capsys.readouterr().out
    assert "demo" in out and "latentforge-runner" in out and "train-generator" in out
    assert cli.main(["ls"]) == 0
    out = capsys.readouterr().out
    for kind in ("encoders", "tokenizers", "generators", "metrics", "recipes"):
        assert f"\n{kind} (" in "\n" + out
    assert "test-vit-tiny" in out and "latentforge-encoders" in out
    assert cli.main(["ls", "configs"]) == 0
    assert "rae-ditdh-xl" in capsys.readouterr().out
    assert cli.main(["ls", "widgets"]) == 2
    assert "unknown kind 'widgets'" in capsys.readouterr().err


def test_cli_overrides_go_before_or_after_the_config():
    argv = ["run", "train-generator", "training.steps=7", "--config", "tiny-rae", "run.seed=3"]
    before = cli.parse_args(argv)
    assert before.config == "tiny-rae" and before.overrides == ["training.steps=7", "run.seed=3"]
    after = cli.parse_args(["validate", "tiny-rae", "--recipe", "train-generator", "training.steps=7"])
    assert after.recipe == "train-generator" and after.overrides == ["training.steps=7"]
    _, cfg = cli.load_settings(before.recipe, before.config, before.overrides)
    assert cfg.training.steps == 7 and cfg.run.seed == 3
    with pytest.raises(SystemExit):
        cli.parse_args(["run", "train-generator", "--config", "tiny-rae", "--bogus", "x=1"])
    with pytest.raises(SystemExit):
        cli.parse_args(["ls", "recipes", "a=1"])


def test_resolved_config_round_trips_through_yaml(tmp_path):
    _, cfg = cli.load_settings("train-generator", "tiny-rae", ["training.steps=7"])
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"recipe": "train-generator", **cfg.to_dict()}))
    assert cli.load_settings(None, str(path))[1] == cfg

"""DiT-family model folders (config.json + diffusion_pytorch_model.safetensors): bit-identical round
trips of DiT, LightningDiT, RAE's LightningDiT and DiT-DH with equal outputs, the DiT as a folder
diffusers' ``DiTTransformer2DModel`` loads itself, loading through the registry's ``pretrained=``,
and the folders that are refused."""

import json

import pytest
import torch

from latentforge_core import registry
from latentforge_core.checkpoint import CheckpointError
from latentforge_core.errors import InputTypeError
from latentforge_generators.dit import DiT
from latentforge_generators.ditdh import DiTDH
from latentforge_generators.folders import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    constructor_arguments,
    from_pretrained,
    save_pretrained,
)
from latentforge_generators.lightningdit import LightningDiT, RAELightningDiT

SHAPE = dict(input_size=8, in_channels=4, num_classes=10)
MODELS = {
    "dit": lambda: DiT(hidden_size=64, depth=2, num_heads=4, learn_sigma=True, time_freq_shift=1, **SHAPE),
    "lightningdit": lambda: LightningDiT(hidden_size=64, depth=2, num_heads=4, use_qknorm=True, mlp_ratio=3.0,
                                         class_dropout_prob=0.2, **SHAPE),
    "rae-lightningdit": lambda: RAELightningDiT(hidden_size=64, depth=2, num_heads=4, **SHAPE),
    "ditdh": lambda: DiTDH(hidden_size=64, depth=2, num_heads=4, head_hidden_size=96, head_depth=1,
                           head_num_heads=2, **SHAPE),
}  # fmt: skip


def randomized(model: torch.nn.Module) -> torch.nn.Module:
    """Off the initialisation (adaLN-Zero's zeros would make every output equal); the frozen sin-cos
    ``pos_embed`` stays, as diffusers' DiT rebuilds it rather than storing it."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


def outputs(model: torch.nn.Module) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(3, 4, 8, 8, generator=g), torch.rand(3, generator=g)
    with torch.no_grad():
        return model(x, t, torch.tensor([0, 5, 10]))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_round_trip_is_bit_identical(name, tmp_path):
    model = randomized(MODELS[name]())
    folder = save_pretrained(model, tmp_path / name)
    config = json.loads((folder / CONFIG_NAME).read_text())
    assert config["_class_name"] == type(model).__name__ and "_latentforge_version" in config
    assert (folder / WEIGHTS_NAME).is_file()
    back = from_pretrained(folder)
    assert type(back) is type(model) and constructor_arguments(back) == constructor_arguments(model)
    a, b = model.state_dict(), back.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(outputs(model), outputs(back))


def test_dit_as_a_diffusers_folder(tmp_path):
    from diffusers import DiTTransformer2DModel

    ours = randomized(MODELS["dit"]())
    folder = save_pretrained(ours, tmp_path / "dit", layout="diffusers")
    assert json.loads((folder / CONFIG_NAME).read_text())["_class_name"] == "DiTTransformer2DModel"
    theirs = DiTTransformer2DModel.from_pretrained(folder).eval()
    g = torch.Generator().manual_seed(2)
    x, t, y = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([0.25, 0.75]), torch.tensor([1, 7])
    with torch.no_grad():
        expected = theirs(x, timestep=t * 999, class_labels=y).sample
        assert (ours(x, t * 999, y) - expected).abs().max().item() < 1e-5
        back = from_pretrained(folder)  # diffusers' layout read back into ours
        assert (back(x, t * 999, y) - expected).abs().max().item() < 1e-5
    a, b = ours.state_dict(), back.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_registry_loads_a_folder_as_pretrained(tmp_path):
    generator = registry.generators.build("test-lightningdit")
    randomized(generator.backbone)
    save_pretrained(generator, tmp_path / "ldit")  # a FlowGenerator: its backbone is written
    again = registry.generators.build("test-lightningdit", pretrained=str(tmp_path / "ldit"))
    assert torch.equal(outputs(generator.backbone), outputs(again.backbone))
    with pytest.raises(CheckpointError, match="model folder of a LightningDiT.*builds a DiTDH"):
        registry.generators.build("test-ditdh", pretrained=str(tmp_path / "ldit"))


# ------------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------------
def test_unknown_class_names_are_refused_with_the_supported_ones(tmp_path):
    folder = save_pretrained(randomized(MODELS["dit"]()), tmp_path / "dit")
    config = json.loads((folder / CONFIG_NAME).read_text())
    (folder / CONFIG_NAME).write_text(json.dumps(config | {"_class_name": "UNet2DConditionModel"}))
    for load in (
        lambda: from_pretrained(folder),
        lambda: registry.generators.build("test-dit", pretrained=str(folder)),
    ):
        with pytest.raises(
            CheckpointError, match=r"UNet2DConditionModel.*DiT, SiT, LightningDiT.*DiTTransformer2DModel"
        ):
            load()


def test_what_cannot_be_written_is_refused(tmp_path):
    with pytest.raises(InputTypeError, match="only a plain DiT"):
        save_pretrained(randomized(MODELS["ditdh"]()), tmp_path / "x", layout="diffusers")
    with pytest.raises(InputTypeError, match="no model folder for a Linear"):
        save_pretrained(torch.nn.Linear(2, 2), tmp_path / "y")

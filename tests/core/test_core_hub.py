"""Hub ids resolve through huggingface_hub's cache (built here by hand; nothing downloads), and
save_pretrained / from_pretrained round-trip a registered component."""

import json

import pytest
import torch

from latentforge_core import registry
from latentforge_core.errors import InputError, MissingFileError
from latentforge_core.hub import HubId, from_pretrained, resolve, save_pretrained

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An offline huggingface_hub cache holding one repository at one commit (its 'main')."""
    import huggingface_hub.constants as hc

    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(cache))

    def add(repo, files, revision="main"):
        root = cache / f"models--{repo.replace('/', '--')}"
        (root / "refs").mkdir(parents=True, exist_ok=True)
        (root / "refs" / revision).write_text(COMMIT)
        snap = root / "snapshots" / COMMIT
        for name, data in files.items():
            (snap / name).parent.mkdir(parents=True, exist_ok=True)
            (snap / name).write_bytes(data)
        return snap

    return add


def test_hub_ids_parse_and_print():
    assert HubId.parse("hf:org/repo") == HubId("org/repo")
    assert HubId.parse("hf:org/repo/sub/w.pt@v1.0") == HubId("org/repo", "sub/w.pt", "v1.0")
    assert str(HubId("org/repo", "w.pt", "abc")) == "hf:org/repo/w.pt@abc"
    for bad in ("hf:repo", "org/repo", "hf:org/repo@", "hf:"):
        with pytest.raises(InputError, match="not a hub id"):
            HubId.parse(bad)


def test_a_cached_file_resolves_offline(hub_cache):
    snap = hub_cache("org/weights", {"decoder/model.pt": b"weights"})
    assert resolve("hf:org/weights/decoder/model.pt").read_bytes() == b"weights"
    assert resolve("hf:org/weights") == snap


def test_offline_without_the_file_names_file_repo_and_place(hub_cache, tmp_path):
    hub_cache("org/weights", {"a.pt": b"x"})
    with pytest.raises(MissingFileError) as err:
        resolve("hf:org/weights/missing.pt")
    message = str(err.value)
    assert "missing.pt" in message and "org/weights" in message and str(tmp_path / "hub") in message
    with pytest.raises(MissingFileError, match="not in the local hub cache"):
        resolve("hf:org/absent")
    with pytest.raises(MissingFileError, match="weights not found"):
        resolve(tmp_path / "nope.pt")


def test_save_and_from_pretrained_round_trip_locally_and_through_the_hub(hub_cache, tmp_path):
    torch.manual_seed(0)
    model = registry.generators.build("test-dit", in_channels=4, input_size=8, num_classes=10)
    folder = save_pretrained(
        model,
        tmp_path / "dit",
        kind="generators",
        name="test-dit",
        params={"in_channels": 4, "input_size": 8, "num_classes": 10},
    )
    assert json.loads((folder / "config.json").read_text())["name"] == "test-dit"
    assert "from_pretrained" in (folder / "README.md").read_text()
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([1, 2])
    expected = model.velocity(x, t, y)
    torch.manual_seed(1)  # other random init: the weights must come from the folder
    local = from_pretrained("generators", folder)
    assert torch.equal(local.velocity(x, t, y), expected)
    hub_cache("org/tiny-dit", {p.name: p.read_bytes() for p in folder.iterdir()})
    remote = from_pretrained("generators", "hf:org/tiny-dit")
    assert torch.equal(remote.velocity(x, t, y), expected)
    with pytest.raises(InputError, match="holds a 'generators' component, not one of 'tokenizers'"):
        from_pretrained("tokenizers", folder)


def test_every_checkpoint_loader_takes_a_hub_id(hub_cache, tmp_path):
    from latentforge_core.checkpoint import load_checkpoint, load_state_file, save_checkpoint

    save_checkpoint({"w": torch.ones(2)}, tmp_path / "w.safetensors", {"name": "x"})
    torch.save({"w": torch.zeros(3)}, tmp_path / "w.pt")
    hub_cache("org/files", {p.name: p.read_bytes() for p in tmp_path.glob("w.*")})
    sd, config = load_checkpoint("hf:org/files/w.safetensors")
    assert torch.equal(sd["w"], torch.ones(2)) and config["name"] == "x"
    assert torch.equal(load_state_file("hf:org/files/w.pt")["w"], torch.zeros(3))

"""One error hierarchy: every error raised on purpose is a LatentforgeError that is also the builtin a
caller expects; argument checks name the argument and what was expected; model constructors and
``generator.sample`` refuse bad values up front instead of failing inside torch."""

from __future__ import annotations

import ast
import math
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from latentforge_core import errors, registry
from latentforge_core.device import resolve_device
from latentforge_core.errors import (
    InputError,
    InputTypeError,
    LatentforgeError,
    MissingDependencyError,
    MissingFileError,
    NumericalError,
    StateError,
    UnsupportedError,
    check_bool,
    check_choice,
    check_divisible,
    check_int,
    check_int_sequence,
    check_number,
    first_line,
)

ROOT = Path(__file__).resolve().parents[2]
BUILTINS = ("ValueError", "TypeError", "RuntimeError", "FileNotFoundError", "KeyError", "FloatingPointError")


# ------------------------------------------------------------------------------------------------
# The hierarchy
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "cls, builtin",
    [
        (InputError, ValueError),
        (InputTypeError, TypeError),
        (StateError, RuntimeError),
        (MissingFileError, FileNotFoundError),
        (NumericalError, FloatingPointError),
        (UnsupportedError, NotImplementedError),
        (MissingDependencyError, ImportError),
    ],
)
def test_each_class_is_a_latentforge_error_and_its_builtin(cls, builtin):
    err = cls("x must be ≥ 1, got 0")
    assert isinstance(err, LatentforgeError) and isinstance(err, builtin)
    with pytest.raises(builtin, match="x must be"):
        raise err


def test_first_line():
    assert first_line(ValueError("bad\nmore")) == "ValueError: bad"
    assert first_line(KeyError()) == "KeyError"


@pytest.mark.parametrize("package", ["core", "encoders", "tokenizers", "generators", "metrics", "runner"])
def test_no_package_raises_a_bare_builtin_on_purpose(package):
    """A ``raise ValueError(...)`` (or TypeError, …) in the components' sources would escape the CLI's
    one catch as a traceback; each is a class of the hierarchy."""
    found = []
    for path in sorted((ROOT / "packages" / package / "src").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Raise) and node.exc is not None:
                exc = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
                if isinstance(exc, ast.Name) and exc.id in BUILTINS and isinstance(node.exc, ast.Call):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno} raise {exc.id}")
    assert not found, "\n".join(found)


# ------------------------------------------------------------------------------------------------
# Argument checks
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", ["32", 3.0, True, None, [3]])
def test_check_int_refuses_what_is_not_an_int(value):
    with pytest.raises(InputTypeError, match=r"DiT: input_size must be an integer ≥ 1, got"):
        check_int(value, "input_size", owner="DiT")


def test_check_int_ranges():
    assert check_int(3, "depth") == 3
    assert check_int(0, "n_iter", minimum=0) == 0
    assert check_int(-5, "shift", minimum=None) == -5
    with pytest.raises(InputError, match=r"^depth must be an integer ≥ 1, got 0$"):
        check_int(0, "depth")


def test_check_number_bounds_and_nan():
    assert check_number(0, "beta", low=0) == 0.0
    assert check_number(0.5, "p", low=0, high=1, high_open=True) == 0.5
    with pytest.raises(InputError, match=r"p must be a number in \[0, 1\), got 1"):
        check_number(1, "p", low=0, high=1, high_open=True)
    with pytest.raises(InputError, match=r"eps must be a number > 0, got 0"):
        check_number(0, "eps", low=0, low_open=True)
    with pytest.raises(InputError, match="got nan"):
        check_number(math.nan, "lr", low=0)
    with pytest.raises(InputTypeError, match=r"lr must be a number ≥ 0, got str '1e-4'"):
        check_number("1e-4", "lr", low=0)


def test_check_choice_divisible_bool_and_sequences():
    with pytest.raises(InputError, match=r"style must be one of 'a', 'b', got 'c'"):
        check_choice("c", "style", ("a", "b"))
    with pytest.raises(InputError, match=r"hidden_size 100 must be divisible by num_heads 16 \(e.g. 96\)"):
        check_divisible(100, "hidden_size", 16, "num_heads")
    with pytest.raises(InputTypeError, match=r"learn_sigma must be true or false, got str 'false'"):
        check_bool("false", "learn_sigma")
    assert check_int_sequence([1, 2], "ch_mult") == (1, 2)
    with pytest.raises(InputTypeError, match="ch_mult must be a non-empty list of integers"):
        check_int_sequence([], "ch_mult")
    with pytest.raises(InputError, match=r"ch_mult\[1\] must be an integer ≥ 1, got 0"):
        check_int_sequence([1, 0], "ch_mult")


@pytest.mark.parametrize(
    "device, cls, words",
    [
        ("gpu", InputError, "'gpu' is not a device torch knows"),
        ("cuda:x", InputError, "expected 'auto', 'cpu', 'cuda' or 'cuda:N'"),
        (3, InputTypeError, "device must be"),
    ],
)
def test_resolve_device_names_the_device(device, cls, words):
    with pytest.raises(cls, match=words):
        resolve_device(device)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is present here")
def test_resolve_device_without_cuda_is_a_state_error():
    with pytest.raises(StateError, match="CUDA is not available"):
        resolve_device("cuda")


# ------------------------------------------------------------------------------------------------
# Model constructors check their arguments
# ------------------------------------------------------------------------------------------------
def _model(name: str):
    import latentforge_encoders.vit as vit
    import latentforge_generators as g

    return {
        "DiT": g.DiT,
        "LightningDiT": g.LightningDiT,
        "DiTDH": g.DiTDH,
        "GPT": g.GPT,
        "MaskGIT": g.MaskGIT,
        "DiGITStage2": g.DiGITStage2,
        "VisionTransformer": vit.VisionTransformer,
    }[name]


SMALL = {
    "DiT": dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=1, num_heads=2),
    "LightningDiT": dict(input_size=8, in_channels=4, hidden_size=32, depth=1, num_heads=2),
    "DiTDH": dict(input_size=8, in_channels=4, hidden_size=32, depth=1, num_heads=2, head_hidden_size=32,
                  head_num_heads=2),
    "GPT": dict(vocab_size=8, grid_size=2, dim=32, depth=1, num_heads=2),
    "MaskGIT": dict(vocab_size=8, grid_size=2, dim=32, depth=1, num_heads=2),
    "DiGITStage2": dict(vocab_size=8, cond_vocab_size=8, grid_size=2, dim=32, depth=1, num_heads=2),
    "VisionTransformer": dict(image_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2),
}  # fmt: skip

CONSTRUCTOR_CASES = [
    # (id, class, bad keyword arguments, error, words in the message)
    ("dit-input-size-str", "DiT", {"input_size": "32"}, InputTypeError, "DiT: input_size must be an integer"),
    ("dit-not-divisible", "DiT", {"input_size": 9}, InputError, "divisible by patch_size"),
    ("dit-depth-zero", "DiT", {"depth": 0}, InputError, "depth must be an integer ≥ 1, got 0"),
    ("dit-heads-bool", "DiT", {"num_heads": True}, InputTypeError, "num_heads"),
    ("dit-hidden-heads", "DiT", {"hidden_size": 30, "num_heads": 4}, InputError, "divisible by num_heads"),
    ("dit-dropout", "DiT", {"class_dropout_prob": 1.5}, InputError, "class_dropout_prob"),
    ("dit-classes", "DiT", {"num_classes": -1}, InputError, "num_classes"),
    ("dit-flag-str", "DiT", {"learn_sigma": "no"}, InputTypeError, "learn_sigma must be true or false"),
    ("lightningdit-channels", "LightningDiT", {"in_channels": 0}, InputError, "LightningDiT: in_channels"),
    ("ditdh-head-heads", "DiTDH", {"head_num_heads": 5}, InputError, "head_num_heads"),
    ("ditdh-size-float", "DiTDH", {"input_size": 8.0}, InputTypeError, "input_size"),
    ("gpt-vocab", "GPT", {"vocab_size": 0}, InputError, "GPT: vocab_size"),
    ("gpt-grid-str", "GPT", {"grid_size": "4"}, InputTypeError, "grid_size"),
    ("gpt-style", "GPT", {"style": "fancy"}, InputError, "unknown block style"),
    (
        "maskgit-dim",
        "MaskGIT",
        {"dim": 30, "num_heads": 4},
        InputError,
        "dim 30 must be divisible by num_heads",
    ),
    ("stage2-grid", "DiGITStage2", {"grid_size": (4, "4")}, InputTypeError, "grid_size[1]"),
    ("vit-patch", "VisionTransformer", {"patch_size": 0}, InputError, "patch_size"),
    ("vit-image-size", "VisionTransformer", {"image_size": "16"}, InputTypeError, "image_size"),
]


@pytest.mark.parametrize("case", CONSTRUCTOR_CASES, ids=[c[0] for c in CONSTRUCTOR_CASES])
def test_constructors_name_the_bad_argument(case):
    _, name, bad, cls, words = case
    with pytest.raises(cls) as info:
        _model(name)(**{**SMALL[name], **bad})
    assert words in str(info.value)
    assert isinstance(info.value, LatentforgeError)


@pytest.mark.parametrize("name", sorted(SMALL))
def test_the_small_sizes_build(name):
    assert _model(name)(**SMALL[name]) is not None


def test_tokenizer_constructors_name_the_bad_argument():
    from latentforge_tokenizers.kmeans import KMeans
    from latentforge_tokenizers.rae import RAEDecoder
    from latentforge_tokenizers.vavae import VAVAE
    from latentforge_tokenizers.vqgan import VQGAN

    with pytest.raises(InputTypeError, match="KMeans: n_clusters must be an integer"):
        KMeans(2.5)
    with pytest.raises(InputError, match="VQGAN: ch_mult"):
        VQGAN(ch=32, ch_mult=(1, 0))
    with pytest.raises(InputError, match="VAVAE: dropout must be a number in"):
        VAVAE(ch=32, ch_mult=(1, 2), attn_resolutions=(), resolution=16, dropout=1.5)
    with pytest.raises(InputError, match="RAEDecoder: hidden_size 30 must be divisible by num_heads 4"):
        RAEDecoder(
            latent_dim=8, hidden_size=30, depth=1, num_heads=4, mlp_dim=16, patch_size=2, num_patches=4
        )


# ------------------------------------------------------------------------------------------------
# generator.sample keywords, checked without a model and again at sampling time
# ------------------------------------------------------------------------------------------------
SAMPLER_CASES = [
    ("test-ditdh", {"sampler": "eulr"}, InputError, "sampler.sampler must be one of 'euler'"),
    ("test-ditdh", {"steps": 0}, InputError, "sampler.steps must be an integer ≥ 1, got 0"),
    ("test-ditdh", {"cfg_scale": -1.0}, InputError, "sampler.cfg_scale must be a number ≥ 0"),
    ("test-ditdh", {"cfg_interval": [0.5, 1.2]}, InputError, "sampler.cfg_interval[1]"),
    ("test-ditdh", {"cfg_interval": [0.8, 0.2]}, InputError, "t_min ≤ t_max"),
    ("test-ditdh", {"cfg_sacle": 2.0}, InputTypeError, "Did you mean 'cfg_scale'"),
    ("test-ditdh", {"atol": 1e-3}, InputTypeError, "an option of sampler 'dopri5'"),
    ("test-ditdh", {"sampler": "sde", "steps": 1}, InputError, "≥ 2 for the SDE sampler"),
    ("test-ditdh", {"noise": 1}, InputError, "given by the recipe"),
    ("test-gpt", {"steps": 4}, InputTypeError, "unknown option 'sampler.steps'"),
    ("test-gpt", {"top_p": 1.5}, InputError, "sampler.top_p must be a number in (0, 1]"),
    ("test-maskgit", {"choice_temperature": -1}, InputError, "choice_temperature"),
    (None, {"temperature": 0}, InputError, "sampler.temperature must be a number > 0"),
]


@pytest.mark.parametrize("target, options, cls, words", SAMPLER_CASES)
def test_sample_options_are_checked_without_a_model(target, options, cls, words):
    from latentforge_generators.samplers import check_sample_options

    with pytest.raises(cls) as info:
        check_sample_options(target, options)
    assert words in str(info.value)


def test_good_sample_options_pass():
    from latentforge_generators.samplers import check_sample_options

    check_sample_options("test-ditdh", {"sampler": "dopri5", "atol": 1e-4, "cfg_scale": 1.5})
    check_sample_options("test-ditdh", {"sampler": "sde", "steps": 10, "last_step": "euler"})
    check_sample_options("test-gpt", {"top_k": 5, "cfg_scale": 2.0})
    check_sample_options("test-digit-stage2-maskgit", {"steps": 4, "top_p": 0.8})


def test_sample_refuses_bad_options_at_sampling_time():
    flow = registry.generators.build("test-ditdh")
    with pytest.raises(InputError, match=r"FlowGenerator.sample: cfg_scale must be a number ≥ 0, got -1"):
        flow.sample(torch.tensor([0]), cfg_scale=-1.0, steps=1)
    with pytest.raises(InputTypeError, match="unknown option 'atol'"):
        flow.sample(torch.tensor([0]), steps=1, atol=1e-3)
    gpt = registry.generators.build("test-gpt", vocab_size=8, grid_size=2, num_classes=2)
    with pytest.raises(InputError, match=r"GPT.sample: cfg_scale must be a number ≥ 0"):
        gpt.sample(torch.tensor([0]), cfg_scale=-2.0)
    from latentforge_generators.guidance import CFG

    with pytest.raises(InputError, match="guidance scale must be a number ≥ 0"):
        CFG(scale=-1.0)


# ------------------------------------------------------------------------------------------------
# Registry clashes, listed for the CLI
# ------------------------------------------------------------------------------------------------
def _dist(root: Path, name: str, entries: dict[str, str], group: str) -> None:
    info = root / f"{name.replace('-', '_')}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    lines = "\n".join(f"{k} = {v}" for k, v in entries.items())
    (info / "entry_points.txt").write_text(textwrap.dedent(f"[{group}]\n{lines}\n"))


def test_registry_lists_names_claimed_twice(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv(registry.DISABLE_AUTOLOAD_ENV, raising=False)
    group = "latentforge.errtestkind"
    _dist(tmp_path, "acme-widgets", {"gear": "lfx_a:make", "solo": "lfx_a:make"}, group)
    _dist(tmp_path, "bolt-widgets", {"gear": "lfx_b:make"}, group)
    reg = registry.Registry(group, "widget")
    (line,) = reg.clashes()
    assert "'gear' is ambiguous" in line and "acme-widgets 1.0" in line and "'bolt-widgets/gear'" in line
    assert "lfx_a" not in sys.modules  # listing imports nothing


def test_errors_module_exports_the_checks():
    for name in ("check_int", "check_ints", "check_number", "check_choice", "check_divisible", "check_bool"):
        assert callable(getattr(errors, name))


def test_named_sizes_refuse_unknown_and_fixed_arguments():
    with pytest.raises(
        InputTypeError, match=r"DiT takes no parameter 'lern_sigma'. Did you mean 'learn_sigma'"
    ):
        registry.generators.build("test-dit", lern_sigma=True)
    with pytest.raises(InputTypeError, match=r"LightningDiT: depth is fixed by the named size \(depth=2\)"):
        registry.generators.build("test-lightningdit", depth=3)


def test_a_third_party_builder_that_fails_is_named(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv(registry.DISABLE_AUTOLOAD_ENV, raising=False)
    group = "latentforge.errtestbuild"
    _dist(tmp_path, "acme-bad", {"boom": "lfx_boom:make"}, group)
    (tmp_path / "lfx_boom.py").write_text(
        "def make(**kw):\n    raise RuntimeError('the builder fell over')\n"
    )
    reg = registry.Registry(group, "widget")
    with pytest.raises(
        registry.PluginLoadError, match=r"'boom'.*acme-bad 1.0.*RuntimeError: the builder fell"
    ):
        reg.build("boom")
    sys.modules.pop("lfx_boom", None)


def test_checkpoint_io_names_folders_and_non_tensors(tmp_path):
    from latentforge_core.checkpoint import load_checkpoint, save_checkpoint

    with pytest.raises(MissingFileError, match="is a folder, not a file"):
        load_checkpoint(tmp_path)
    with pytest.raises(InputTypeError, match=r"state_dict\['w'\] must be a tensor.*got float"):
        save_checkpoint({"w": 1.0}, tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()

"""Weights by hub id: ``hf:<org>/<repo>[/<file in repo>][@<revision>]`` through ``huggingface_hub``.

A hub id resolves to a local path in huggingface_hub's cache (``HF_HOME``, revision pinning,
``HF_HUB_OFFLINE=1``), so every loader that takes a path takes a hub id too.  Offline and not cached,
the error names the file, the repository and where to place the file.  Components are saved in the
diffusers manner: :func:`save_pretrained` writes a folder with ``model.safetensors``, the builder's
name and arguments as ``config.json`` and a model card; :func:`from_pretrained` builds the registered
component back from such a folder (local or on the hub); :func:`push_to_hub` uploads the folder.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs
import torch

from latentforge_core.checkpoint import atomic_path, load_checkpoint, load_into, save_checkpoint
from latentforge_core.errors import InputError, MissingFileError

PREFIX = "hf:"
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
CARD_NAME = "README.md"
_SPEC = re.compile(r"^(?P<repo>[\w.-]+/[\w.-]+)(?:/(?P<file>[^@]+?))?(?:@(?P<revision>[\w./-]+))?$")


@attrs.frozen
class HubId:
    """A parsed ``hf:`` id: the repository, an optional file inside it, an optional revision."""

    repo: str
    file: str | None = None
    revision: str | None = None

    @classmethod
    def parse(cls, source: str) -> HubId:
        match = _SPEC.match(source.removeprefix(PREFIX))
        if not source.startswith(PREFIX) or match is None:
            raise InputError(
                f"{source!r} is not a hub id: expected 'hf:<org>/<repo>', 'hf:<org>/<repo>/<file>' "
                "or either with '@<revision>'"
            )
        return cls(match["repo"], match["file"], match["revision"])

    def __str__(self) -> str:
        file = f"/{self.file}" if self.file else ""
        revision = f"@{self.revision}" if self.revision else ""
        return f"{PREFIX}{self.repo}{file}{revision}"


def is_hub_id(source: object) -> bool:
    return isinstance(source, str) and source.startswith(PREFIX)


def resolve(source: str | os.PathLike) -> Path:
    """A local path for ``source``: itself when it is a path, else the hub file (or, without a file,
    the repository snapshot) from huggingface_hub's cache, downloading when online."""
    if not is_hub_id(source):
        path = Path(source)
        if not path.exists():
            raise MissingFileError(
                f"weights not found: {path} (expected a local file or folder, or 'hf:<org>/<repo>')"
            )
        return path
    hub = HubId.parse(str(source))
    from huggingface_hub import hf_hub_download, snapshot_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        if hub.file is None:
            return Path(snapshot_download(hub.repo, revision=hub.revision))
        return Path(hf_hub_download(hub.repo, hub.file, revision=hub.revision))
    except LocalEntryNotFoundError as err:
        from huggingface_hub.constants import HF_HUB_CACHE

        what = hub.file or "the repository snapshot"
        raise MissingFileError(
            f"{what} of {hub.repo} (revision {hub.revision or 'main'}) is not in the local hub cache and "
            f"the hub cannot be reached (HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', '0')}): download "
            f"it once online, or place it under {HF_HUB_CACHE}, or pass a local path instead of {hub}"
        ) from err
    except (EntryNotFoundError, RepositoryNotFoundError) as err:
        raise MissingFileError(
            f"{hub}: the hub has no such repository or file ({type(err).__name__})"
        ) from err


# ------------------------------------------------------------------------------------------------
# save_pretrained / from_pretrained / push_to_hub
# ------------------------------------------------------------------------------------------------
def save_pretrained(
    module: torch.nn.Module,
    folder: str | os.PathLike,
    *,
    kind: str,
    name: str,
    params: Mapping[str, Any] | None = None,
    card: str | None = None,
) -> Path:
    """Write ``folder/{model.safetensors, config.json, README.md}``: the weights, the registry entry
    (``kind``, ``name``) with the builder arguments ``params`` that rebuild it, and a model card."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = {"kind": kind, "name": name, "params": dict(params or {})}
    try:
        text = json.dumps(config, indent=2, sort_keys=True)
    except TypeError as err:
        raise InputError(
            f"params of {name!r} must be JSON values (numbers, strings, lists, dicts): {err}"
        ) from err
    save_checkpoint(module.state_dict(), folder / WEIGHTS_NAME, config)
    with atomic_path(folder / CONFIG_NAME) as tmp:
        tmp.write_text(text + "\n")
    with atomic_path(folder / CARD_NAME) as tmp:
        tmp.write_text(card if card is not None else model_card(config))
    return folder


def model_card(config: Mapping[str, Any], recipe: str | None = None, data: str | None = None) -> str:
    """A minimal model card: what the folder holds and how to load it."""
    lines = [
        "---",
        "library_name: latentforge",
        "tags: [latentforge, " + str(config["kind"]) + "]",
        "---",
        f"# {config['name']}",
        "",
        f"A latentforge {config['kind'].rstrip('s')} (`{config['name']}`).",
    ]
    if recipe:
        lines.append(f"Trained with the `{recipe}` recipe" + (f" on {data}." if data else "."))
    lines += [
        "",
        "```python",
        "from latentforge_core.hub import from_pretrained",
        "",
        f'model = from_pretrained("{config["kind"]}", "path/or/hf:<org>/<repo>")',
        "```",
        "",
    ]
    return "\n".join(lines)


def from_pretrained(kind: str, source: str | os.PathLike, **overrides: Any) -> Any:
    """Build the registered ``kind`` entry a :func:`save_pretrained` folder (a path or a hub id)
    describes, with its weights; ``overrides`` replace builder arguments."""
    from latentforge_core import registry

    folder = resolve(source)
    if folder.is_file():
        raise InputError(f"{source} is a file; from_pretrained expects a folder written by save_pretrained")
    if not (folder / CONFIG_NAME).is_file():
        raise MissingFileError(f"{folder} has no {CONFIG_NAME}: expected a folder written by save_pretrained")
    config = json.loads((folder / CONFIG_NAME).read_text())
    if config.get("kind") != kind:
        raise InputError(f"{source} holds a {config.get('kind')!r} component, not one of {kind!r}")
    if kind not in registry.REGISTRIES:
        raise InputError(f"unknown kind {kind!r}; expected one of {', '.join(registry.REGISTRIES)}")
    component = registry.REGISTRIES[kind].build(config["name"], **{**config["params"], **overrides})
    load_into(component, load_checkpoint(folder / WEIGHTS_NAME)[0])
    return component


def push_to_hub(folder: str | os.PathLike, repo_id: str, *, private: bool = True, **kwargs: Any) -> str:
    """Upload a :func:`save_pretrained` folder to ``repo_id`` (created if needed); returns its URL."""
    from huggingface_hub import HfApi

    folder = Path(folder)
    if not (folder / CONFIG_NAME).is_file() or not (folder / WEIGHTS_NAME).is_file():
        raise MissingFileError(f"{folder} is not a save_pretrained folder ({CONFIG_NAME} and {WEIGHTS_NAME})")
    api = HfApi()
    api.create_repo(repo_id, private=private, exist_ok=True)
    info = api.upload_folder(repo_id=repo_id, folder_path=str(folder), **kwargs)
    return str(getattr(info, "commit_url", info))

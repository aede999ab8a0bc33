"""Find, download and read ViT checkpoints: a Hub repo id, a local folder laid out like one, or one file.

Downloads go through huggingface_hub, the local cache first: a cached model loads with no network at all,
and when the Hub cannot be reached the failure comes back at once instead of after huggingface_hub's
retries. Weights are read with safetensors, or from pickles only through `torch.load(weights_only=True)`,
which refuses anything but tensors; nothing from a download is ever executed.
"""

from __future__ import annotations

import json
import os
import pickle
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from huggingface_hub import HfApi, constants, hf_hub_download, try_to_load_from_cache
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HFValidationError,
    HTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from safetensors import SafetensorError
from safetensors.torch import load_file

from . import convert, preprocess
from .model import ViTConfig

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.pth", "model.pt")
PICKLE_SUFFIXES = (".bin", ".pth", ".pt", ".ckpt")
METADATA_FILES = ("config.json", "preprocessor_config.json")
HUB_TIMEOUT = 10.0  # seconds for the one metadata request that tells whether the Hub answers
SUPPORTED = (
    "transformers ViT/DeiT (google/vit-*, facebook/deit-*), timm vision_transformer/deit (timm/vit_*, timm/deit_*) "
    "and torchvision vit_* state dicts"
)


class ModelLoadError(RuntimeError):
    """A checkpoint could not be found, read or understood. The message says what to do."""


@dataclass
class Checkpoint:
    """A checkpoint converted to vit_demo's names, with everything needed to use it."""

    state_dict: dict[str, torch.Tensor]
    config: ViTConfig
    preprocess: preprocess.PreprocessConfig
    labels: list[str]
    format: str  # "transformers", "timm" or "torchvision"
    name: str


def load_checkpoint(source: str | os.PathLike, revision: str | None = None) -> Checkpoint:
    """Reads a checkpoint from a Hub repo id, a local folder or a weights file, in any supported format.

    Args:
        source: "google/vit-base-patch16-224", "./my-vit/" or "vit_b_16.pth".
        revision: branch, tag or commit of a Hub repo.
    Raises:
        ModelLoadError: with a one-sentence message for the user.
    """
    weights, meta = locate(source, revision)
    config = meta.get("config.json") or {}
    _check_is_vit(config, source)
    sd = read_weights(weights)
    try:
        sd, cfg, fmt = convert.convert(sd, config)
    except convert.ConversionError as e:
        raise ModelLoadError(f"{source}: {e} Supported: {SUPPORTED}.") from e
    if fmt == "transformers" and not config:
        raise ModelLoadError(
            f"{source} has transformers weights but no config.json (it gives the number of heads and the labels): "
            "put the repo's config.json next to the weights."
        )
    if cfg.num_heads < 1 or cfg.embed_dim % cfg.num_heads:
        raise ModelLoadError(
            f"{source}: {cfg.embed_dim} channels cannot be split into {cfg.num_heads} attention heads: "
            "check num_attention_heads in its config.json."
        )
    pp = _preprocessing(source, fmt, config, meta, cfg)
    return Checkpoint(sd, cfg, pp, _labels(config, cfg.num_classes), fmt, str(source))


def _preprocessing(source, fmt: str, config: dict, meta: dict, cfg: ViTConfig) -> preprocess.PreprocessConfig:
    """The checkpoint's own preprocessing; ModelLoadError for settings vit_demo cannot follow."""
    where = {"transformers": "preprocessor_config.json", "timm": "config.json's pretrained_cfg"}.get(fmt, "its recipe")
    try:
        if fmt == "transformers":
            pp = preprocess.from_transformers(meta.get("preprocessor_config.json") or {})
        elif fmt == "timm":
            pp = preprocess.from_timm(config.get("pretrained_cfg") or {})
        else:
            pp = preprocess.torchvision_default(cfg.img_size)
        if cfg.in_chans == 1:
            pp.mode, pp.mean, pp.std = "L", pp.mean[:1], pp.std[:1]
        preprocess.check_channels(pp, cfg.in_chans)
    except preprocess.PreprocessError as e:
        raise ModelLoadError(
            f"{source} asks for preprocessing vit_demo cannot follow ({where}: {e}): fix {where}, or use another checkpoint."
        ) from e
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ModelLoadError(
            f"{source} has preprocessing settings vit_demo cannot read ({where}: {type(e).__name__} {e}): "
            f"fix {where}, or use another checkpoint."
        ) from e
    return pp


def locate(source: str | os.PathLike, revision: str | None = None) -> tuple[Path, dict[str, dict]]:
    """Finds the weights file and reads the JSON metadata next to it.

    Returns:
        (path of the weights file, {"config.json": dict, "preprocessor_config.json": dict} for those present).
    """
    path = Path(source).expanduser()
    if path.is_file():  # a Hub repo's weights file, named as the Hub names it, is read with the metadata beside it
        beside = [path.parent / n for n in METADATA_FILES] if path.name in WEIGHT_FILES else []
        return path, {p.name: _read_json(p) for p in beside if p.is_file()}
    if path.is_dir():
        files = {p.name: p for p in path.iterdir() if p.is_file()}
        weights = _pick_weights(files, str(source))
        return files[weights], {n: _read_json(files[n]) for n in METADATA_FILES if n in files}
    if looks_local(str(source)):
        raise ModelLoadError(f"No file or folder at {source}: check the path (Hub ids have the form org/name).")
    return _from_hub(str(source), revision)


def looks_local(name: str) -> bool:
    """Whether `name` reads as a path on this machine rather than a Hub id ("org/name"): it starts with . / ~ or
    a backslash, has no "/" or several, holds ".." or a backslash, ends like a weights file, or exists here."""
    return (
        name.startswith((".", "/", "~")) or "\\" in name or ".." in name or name.count("/") != 1
        or name.endswith((".safetensors",) + PICKLE_SUFFIXES) or Path(name).expanduser().exists()
    )


def _from_hub(repo_id: str, revision: str | None) -> tuple[Path, dict[str, dict]]:
    try:
        cached = _from_cache(repo_id, revision)
    except HFValidationError as e:
        raise ModelLoadError(f"'{repo_id}' is neither a local path nor a valid Hub model id: check the spelling.") from e
    if cached is not None:
        return cached
    if constants.HF_HUB_OFFLINE:
        raise ModelLoadError(
            f"{repo_id} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set: "
            "download it once with a network connection, or pass a local folder."
        )
    with _hub_errors(repo_id, revision):
        info = HfApi().model_info(repo_id, revision=revision, timeout=HUB_TIMEOUT)
        files = {s.rfilename: None for s in info.siblings or []}
        # By revision, not commit, so that the cache records refs/<revision> and finds the repo offline later.
        path = Path(hf_hub_download(repo_id, _pick_weights(files, repo_id), revision=revision))
        commit = path.parent.name  # snapshots/<commit>/<file>: the metadata comes from the same commit
        meta = {}
        for name in METADATA_FILES:
            fetched = _download_if_present(repo_id, name, commit)  # a file the repo lacks is recorded as such
            if fetched is not None:
                meta[name] = _read_json(fetched)
        return path, meta


@contextmanager
def _hub_errors(repo_id: str, revision: str | None, missing: str | None = None):
    """Turns huggingface_hub's errors into ModelLoadErrors; `missing` names the file a half-cached repo lacks."""
    try:
        yield
    except GatedRepoError as e:
        raise ModelLoadError(
            f"{repo_id} is a gated model: accept its terms on its Hub page, then set HF_TOKEN to a token of that account."
        ) from e
    except RepositoryNotFoundError as e:
        raise ModelLoadError(
            f"No model {repo_id} was found on the Hugging Face Hub: check the id, or set HF_TOKEN if it is private."
        ) from e
    except RevisionNotFoundError as e:
        raise ModelLoadError(f"{repo_id} has no revision '{revision}': check the branch, tag or commit.") from e
    except (HTTPError, OSError) as e:
        if missing:
            raise ModelLoadError(
                f"{repo_id} is only partly in the local Hugging Face cache (no {missing}), and the Hugging Face Hub "
                f"could not be reached to fetch it ({type(e).__name__}): check the network, or download the whole repo once."
            ) from e
        raise ModelLoadError(
            f"The Hugging Face Hub could not be reached to download {repo_id} ({type(e).__name__}): "
            "check the network, or use a model that is cached or in a local folder."
        ) from e


def _from_cache(repo_id: str, revision: str | None) -> tuple[Path, dict[str, dict]] | None:
    """The repo's files from the local Hugging Face cache; None when its weights are not cached.

    A metadata file can be cached, known to be absent from the repo (huggingface_hub records a 404 as
    `_CACHED_NO_EXIST`), or unknown: never downloaded, as when `timm.create_model(pretrained=True)` fetched only
    the weights. An unknown file that sets the preprocessing is fetched (the Hub says whether the repo has it),
    or, offline, the load is refused: the defaults would preprocess the photo wrongly.
    """
    found = [try_to_load_from_cache(repo_id, name, revision=revision) for name in WEIGHT_FILES]
    weights = next((Path(p) for p in found if isinstance(p, str)), None)
    if weights is None:
        return None
    commit = weights.parent.name  # snapshots/<commit>/<file>: the metadata must come from the same commit
    meta = {}
    for name in METADATA_FILES:
        if name == "preprocessor_config.json" and _is_timm(meta.get("config.json")):
            continue  # timm repos keep their preprocessing in config.json
        cached = try_to_load_from_cache(repo_id, name, revision=commit)
        if isinstance(cached, str):
            meta[name] = _read_json(Path(cached))
        elif cached is None:
            fetched = _fetch(repo_id, name, commit)
            if fetched is not None:
                meta[name] = _read_json(fetched)
    return weights, meta


def _fetch(repo_id: str, name: str, commit: str) -> Path | None:
    """A metadata file of a half-cached repo, from the Hub; None when the repo has no such file."""
    if constants.HF_HUB_OFFLINE:
        raise ModelLoadError(
            f"{repo_id} is only partly in the local Hugging Face cache (no {name}) and HF_HUB_OFFLINE is set: "
            "download the whole repo once with a network connection, or pass a local folder."
        )
    with _hub_errors(repo_id, commit, missing=name):
        HfApi().model_info(repo_id, revision=commit, timeout=HUB_TIMEOUT)  # fails at once where downloads would retry
        return _download_if_present(repo_id, name, commit)


def _download_if_present(repo_id: str, name: str, commit: str) -> Path | None:
    """hf_hub_download, or None when the repo has no such file (huggingface_hub then records that in the cache,
    so that a later load, offline too, knows it is absent rather than not yet downloaded)."""
    try:
        return Path(hf_hub_download(repo_id, name, revision=commit))
    except EntryNotFoundError:
        return None


def _is_timm(config: dict | None) -> bool:
    return bool(config) and ("architecture" in config or "pretrained_cfg" in config)


def _pick_weights(files, where: str) -> str:
    for name in WEIGHT_FILES:
        if name in files:
            return name
    candidates = sorted(n for n in files if n.endswith((".safetensors",) + PICKLE_SUFFIXES))
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise ModelLoadError(f"{where} holds no weights file (model.safetensors or pytorch_model.bin): supported are {SUPPORTED}.")
    raise ModelLoadError(f"{where} holds several weights files ({', '.join(candidates)}): pass the path of one of them.")


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{path.name} is not valid JSON: download the model again or fix the file.") from e
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path.name} is not a JSON object: download the model again or fix the file.")
    return data


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file, or a pickle read with weights_only=True (tensors and plain containers only)."""
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise ModelLoadError(f"{path.name} is not a readable safetensors file (it may be truncated): download it again.") from e
    unreadable = f"{path.name} is not a readable PyTorch weights file: download it again."
    if not _is_torch_save(path):
        raise ModelLoadError(unreadable)
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ModelLoadError(
            f"{path.name} contains more than tensors (objects or code) and was refused: use a safetensors file."
        ) from e
    except Exception as e:  # noqa: BLE001 - a damaged file makes the unpickler fail in many ways (IndexError, ...)
        raise ModelLoadError(unreadable) from e
    for key in ("state_dict", "model", "model_state_dict"):  # common training-checkpoint wrappers
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ModelLoadError(f"{path.name} is not a state dict of tensors: save the model's state_dict() instead.")
    return sd


def _is_torch_save(path: Path) -> bool:
    """torch.save writes a zip archive, or (before PyTorch 1.6) a pickle: protocol 2 or above starts with 0x80."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        return False
    return head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"


def _check_is_vit(config: dict, source) -> None:
    model_type = config.get("model_type")
    arch = config.get("architecture", "")
    if model_type is not None and model_type not in ("vit", "deit"):
        raise ModelLoadError(f"{source} is a '{model_type}' model, not a ViT: vit_demo reads {SUPPORTED}.")
    if arch and not arch.startswith(("vit_", "deit_")):
        raise ModelLoadError(f"{source} is a timm '{arch}', not a ViT: vit_demo reads {SUPPORTED}.")


def _labels(config: dict, num_classes: int) -> list[str]:
    """id2label from the config; ImageNet-1k names for 1000 classes without any; class_N otherwise."""
    id2label = config.get("id2label") or {}
    id2label = id2label if isinstance(id2label, dict) else {}
    names = config.get("label_names")  # timm
    if isinstance(names, list) and len(names) == num_classes:
        return list(names)
    if len(id2label) == num_classes and not all(str(v).startswith("LABEL_") for v in id2label.values()):
        return [str(id2label.get(str(i), id2label.get(i, f"class_{i}"))) for i in range(num_classes)]
    if num_classes == 1000:
        return imagenet_classes()
    return [f"class_{i}" for i in range(num_classes)]


def imagenet_classes() -> list[str]:
    """The 1000 ImageNet-1k class names, in index order (from torchvision's metadata; no download)."""
    from torchvision.models import ViT_B_16_Weights

    return list(ViT_B_16_Weights.IMAGENET1K_V1.meta["categories"])

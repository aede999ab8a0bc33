"""Find, download and read ViT checkpoints: a Hub repo id, a local folder laid out like one, or one file.

Downloads go through huggingface_hub, the local cache first: a cached model loads with no network at all,
and when the Hub cannot be reached the failure comes back at once instead of after huggingface_hub's
retries. Weights are read with safetensors, or from pickles only through `torch.load(weights_only=True)`,
which refuses anything but tensors; nothing from a download is ever executed.

A checkpoint is input (`checkpoint_checks`): from the Hub, config.json and the preprocessing are fetched and
checked first, then the weights' size (from the Hub's file metadata, capped by VIT_DEMO_MAX_WEIGHTS_MB) and, for
safetensors, their names and shapes (from the file's header, read with a range request); only then are the
weights downloaded. A refused or failed download of a repo that was not cached before leaves nothing in the cache.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from huggingface_hub import HfApi, constants, get_hf_file_metadata, hf_hub_download, hf_hub_url, scan_cache_dir
from huggingface_hub import try_to_load_from_cache
from huggingface_hub.errors import (
    CacheNotFound,
    GatedRepoError,
    HFValidationError,
    HTTPError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
    SafetensorsParsingError,
)
from huggingface_hub.file_download import repo_folder_name
from huggingface_hub.utils import validate_repo_id
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from . import convert, preprocess
from .checkpoint_checks import (
    SUPPORTED,
    ModelLoadError,
    check_architecture,
    check_finite,
    check_input,
    check_metadata,
    meta_tensors,
)
from .model import ViTConfig

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.pth", "model.pt")
PICKLE_SUFFIXES = (".bin", ".pth", ".pt", ".ckpt")
METADATA_FILES = ("config.json", "preprocessor_config.json")
HUB_TIMEOUT = 10.0  # seconds for the one metadata request that tells whether the Hub answers


def _env_mb(name: str, default_mb: int) -> int:
    try:
        return max(1, int(float(os.environ.get(name, "") or default_mb))) * 1024**2
    except ValueError:
        return default_mb * 1024**2


# The largest weights file downloaded from the Hub (ViT-L/16 in float32 is 1.2 GB).
MAX_WEIGHTS_BYTES = _env_mb("VIT_DEMO_MAX_WEIGHTS_MB", 1500)
# safetensors' dtype names -> torch's, for checking a file's header before its data is read.
_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64,
    "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}


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

    Every value it carries is checked (`checkpoint_checks`) before anything is built from it: the metadata, then
    the weights' names and shapes (for safetensors from the file's header, before its data is read), then the
    input size and attention memory the preprocessing asks for, then the weights' values.

    Args:
        source: "google/vit-base-patch16-224", "./my-vit/" or "vit_b_16.pth".
        revision: branch, tag or commit of a Hub repo.
    Raises:
        ModelLoadError: with a one-sentence message for the user.
    """
    fresh = _fresh_hub_id(source, revision)  # a refused download of it leaves nothing behind
    try:
        weights, meta = locate(source, revision)
        shapes = _header_shapes(weights)
        if shapes is not None:  # names and shapes checked before the data is read
            vet(source, meta, meta_tensors(shapes, source))
        sd, cfg, fmt, pp = vet(source, meta, read_weights(weights))
        check_finite(source, sd)
    except BaseException:
        if fresh:
            forget_download(str(source))
        raise
    return Checkpoint(sd, cfg, pp, _labels(meta.get("config.json") or {}, cfg.num_classes), fmt, str(source))


def vet(source, meta: dict[str, dict], sd: dict[str, torch.Tensor]):
    """Checks a checkpoint's metadata, converts its weights (real or "meta" tensors) and checks them against the
    architecture and the input the preprocessing asks for.

    Returns:
        (state dict in vit_demo's names, ViTConfig, format, PreprocessConfig).
    """
    config = meta.get("config.json") or {}
    check_metadata(source, config, meta.get("preprocessor_config.json"))
    try:
        sd, cfg, fmt = convert.convert(sd, config)
    except convert.ConversionError as e:
        raise ModelLoadError(f"{source}: {e} Supported: {SUPPORTED}.") from e
    except (RuntimeError, ValueError, TypeError, IndexError, KeyError) as e:  # shapes that cannot be fused
        detail = str(e).strip().splitlines()[-1].strip() if str(e).strip() else type(e).__name__
        raise ModelLoadError(
            f"The weights of {source} do not fit together as a ViT ({detail}): the file may be damaged or edited."
        ) from e
    if fmt == "transformers" and not config:
        raise ModelLoadError(
            f"{source} has transformers weights but no config.json (it gives the number of heads and the labels): "
            "put the repo's config.json next to the weights."
        )
    check_architecture(source, sd, cfg)
    pp, where = _preprocessing(source, fmt, config, meta, cfg)
    check_input(source, cfg, pp.input_size, pp.resize, where)
    return sd, cfg, fmt, pp


def _preprocessing(source, fmt: str, config: dict, meta: dict, cfg: ViTConfig) -> tuple[preprocess.PreprocessConfig, str]:
    """The checkpoint's own preprocessing, and which file and key set its input size; ModelLoadError for settings
    vit_demo cannot follow."""
    where = {"transformers": "preprocessor_config.json", "timm": "config.json's pretrained_cfg"}.get(fmt, "its recipe")
    pp_json = meta.get("preprocessor_config.json") or {}
    size_key = {
        "transformers": "preprocessor_config.json's " + ("crop_size" if pp_json.get("do_center_crop") else "size"),
        "timm": "config.json's pretrained_cfg input_size",
    }.get(fmt, "its position embeddings (pos_embed)")
    try:
        if fmt == "transformers":
            pp = preprocess.from_transformers(pp_json)
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
    except (KeyError, TypeError, ValueError, AttributeError, ZeroDivisionError) as e:
        raise ModelLoadError(
            f"{source} has preprocessing settings vit_demo cannot read ({where}: {type(e).__name__} {e}): "
            f"fix {where}, or use another checkpoint."
        ) from e
    return pp, size_key


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
        name = _pick_weights([s.rfilename for s in info.siblings or []], repo_id)
        commit = info.sha
        meta = {}
        for file in METADATA_FILES:  # metadata first: a repo that is not a ViT is refused before its weights
            fetched = _download_if_present(repo_id, file, commit)  # a file the repo lacks is recorded as such
            if fetched is not None:
                meta[file] = _read_json(fetched)
        check_metadata(repo_id, meta.get("config.json") or {}, meta.get("preprocessor_config.json"))
        _check_remote_weights(repo_id, name, commit, meta)
        # By revision, not commit, so that the cache records refs/<revision> and finds the repo offline later.
        path = Path(hf_hub_download(repo_id, name, revision=revision))
        if commit and path.parent.name != commit:
            raise ModelLoadError(f"{repo_id} changed on the Hub while it was loading: try again.", transient=True)
        return path, meta


def _check_remote_weights(repo_id: str, name: str, commit: str | None, meta: dict[str, dict]) -> None:
    """Before downloading the weights: their size from the Hub's file metadata, within MAX_WEIGHTS_BYTES; for
    safetensors, their names and shapes from the file's header (a range request), checked like a loaded file's."""
    size = get_hf_file_metadata(hf_hub_url(repo_id, name, revision=commit), timeout=HUB_TIMEOUT).size
    if size is None or size > MAX_WEIGHTS_BYTES:
        shown = "of unknown size" if size is None else f"{size / 1e6:,.0f} MB"
        raise ModelLoadError(
            f"{repo_id}'s weights file {name} is {shown}, more than this app downloads "
            f"({MAX_WEIGHTS_BYTES / 1e6:,.0f} MB, VIT_DEMO_MAX_WEIGHTS_MB): use a smaller model, or raise the limit."
        )
    if name.endswith(".safetensors"):
        try:
            header = HfApi().parse_safetensors_file_metadata(repo_id, name, revision=commit, timeout=HUB_TIMEOUT)
        except SafetensorsParsingError as e:
            raise ModelLoadError(f"{name} is not a readable safetensors file (it may be truncated): download it again.") from e
        shapes = {k: (list(t.shape), _dtype(t.dtype, name)) for k, t in header.tensors.items()}
        vet(repo_id, meta, meta_tensors(shapes, repo_id))


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
                f"could not be reached to fetch it ({type(e).__name__}): check the network, or download the whole repo once.",
                transient=True,
            ) from e
        raise ModelLoadError(
            f"The Hugging Face Hub could not be reached to download {repo_id} ({type(e).__name__}): "
            "check the network, or use a model that is cached or in a local folder.",
            transient=True,
        ) from e


def _snapshot(repo_id: str, revision: str | None) -> Path | None:
    """The cached snapshot folder of `repo_id` at `revision` (a commit, or a branch or tag the cache has a ref of);
    None when the cache has none. Raises HFValidationError for an invalid id."""
    validate_repo_id(repo_id)
    storage = Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type="model")
    revision = revision or constants.DEFAULT_REVISION
    commit = revision if re.fullmatch(r"[0-9a-f]{40}", revision) else None
    if commit is None:
        try:
            commit = (storage / "refs" / revision).read_text().strip()
        except (OSError, UnicodeDecodeError):
            return None
    folder = storage / "snapshots" / commit
    return folder if re.fullmatch(r"[0-9a-f]{40}", commit) and folder.is_dir() else None


def _from_cache(repo_id: str, revision: str | None) -> tuple[Path, dict[str, dict]] | None:
    """The repo's files from the local Hugging Face cache; None when its weights are not cached.

    The weights file is picked from the cached snapshot's files by the rule that picks it from the Hub's listing
    (`_pick_weights`), so a repo with one weights file of another name loads offline as it does online.
    A metadata file can be cached, known to be absent from the repo (huggingface_hub records a 404 as
    `_CACHED_NO_EXIST`), or unknown: never downloaded, as when `timm.create_model(pretrained=True)` fetched only
    the weights. An unknown file that sets the preprocessing is fetched (the Hub says whether the repo has it),
    or, offline, the load is refused: the defaults would preprocess the photo wrongly.
    """
    weights = cached_weights(repo_id, revision)
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


def cached_weights(repo_id: str, revision: str | None = None) -> Path | None:
    """The weights file of a Hub repo in the local cache, picked from the cached files by the rule that picks it
    from the Hub's listing; None when none is cached. Raises HFValidationError for an invalid id."""
    folder = _snapshot(repo_id, revision)
    if folder is None:
        return None
    files = {p.name: p for p in folder.iterdir() if p.is_file()}
    if not any(n.endswith((".safetensors",) + PICKLE_SUFFIXES) for n in files):
        return None
    return files[_pick_weights(files, repo_id)]


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
    """hf_hub_download, or None when the Hub answers that the repo has no such file (a 404: huggingface_hub then
    records that in the cache, so that a later load, offline too, knows it is absent rather than not yet
    downloaded). Any other failure (a 503, a dropped connection) raises: the file may well exist."""
    try:  # huggingface_hub retries a 5xx or a dropped connection for 23 s: asked once first, failing at once
        get_hf_file_metadata(hf_hub_url(repo_id, name, revision=commit), timeout=HUB_TIMEOUT)
    except RemoteEntryNotFoundError:
        pass  # absent: the download below records that in the cache
    try:
        return Path(hf_hub_download(repo_id, name, revision=commit))
    except RemoteEntryNotFoundError:
        return None


def _fresh_hub_id(source, revision: str | None) -> bool:
    """Whether `source` is a Hub id whose repo is not in the cache yet (so that its download can be undone)."""
    name = str(source)
    if constants.HF_HUB_OFFLINE or looks_local(name):
        return False
    try:
        return _snapshot(name, revision) is None and not _repo_folder(name).exists()
    except HFValidationError:
        return False


def _repo_folder(repo_id: str) -> Path:
    return Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type="model")


def forget_download(repo_id: str) -> None:
    """Deletes `repo_id` from the Hugging Face cache (its revisions with huggingface_hub's cache tools, then what
    is left of its folder: refs, the record of absent files, its download locks)."""
    try:
        cache = scan_cache_dir(constants.HF_HUB_CACHE)
        hashes = [r.commit_hash for repo in cache.repos if repo.repo_id == repo_id and repo.repo_type == "model"
                  for r in repo.revisions]
        if hashes:
            cache.delete_revisions(*hashes).execute()
    except (CacheNotFound, OSError, ValueError):
        pass
    shutil.rmtree(_repo_folder(repo_id), ignore_errors=True)
    shutil.rmtree(Path(constants.HF_HUB_CACHE) / ".locks" / _repo_folder(repo_id).name, ignore_errors=True)


def cache_bytes(repo_ids=None) -> int:
    """Bytes the Hugging Face cache holds on disk (of `repo_ids` only, when given)."""
    try:
        cache = scan_cache_dir(constants.HF_HUB_CACHE)
    except (CacheNotFound, OSError):
        return 0
    return sum(r.size_on_disk for r in cache.repos if repo_ids is None or r.repo_id in repo_ids)


def trim_cache(cap_bytes: int, candidates, keep) -> list[str]:
    """Deletes repos of `candidates` that are not in `keep` from the Hugging Face cache, least recently used
    first, until the cache holds at most `cap_bytes` (or none is left to delete).

    Returns:
        the repo ids deleted.
    """
    try:
        cache = scan_cache_dir(constants.HF_HUB_CACHE)
    except (CacheNotFound, OSError):
        return []
    total = cache.size_on_disk
    deleted = []
    for repo in sorted(cache.repos, key=lambda r: r.last_accessed):
        if total <= cap_bytes:
            break
        if repo.repo_type != "model" or repo.repo_id not in candidates or repo.repo_id in keep:
            continue
        cache.delete_revisions(*(r.commit_hash for r in repo.revisions)).execute()
        shutil.rmtree(_repo_folder(repo.repo_id), ignore_errors=True)
        total -= repo.size_on_disk
        deleted.append(repo.repo_id)
    return deleted


def _header_shapes(path: Path) -> dict[str, tuple[list[int], torch.dtype]] | None:
    """{name: (shape, dtype)} from a safetensors file's header, without reading its data; None for pickles."""
    if path.suffix != ".safetensors":
        return None
    try:
        with safe_open(str(path), "pt") as f:
            return {k: (f.get_slice(k).get_shape(), _dtype(f.get_slice(k).get_dtype(), path.name)) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise ModelLoadError(f"{path.name} is not a readable safetensors file (it may be truncated): download it again.") from e


def _dtype(name: str, file: str) -> torch.dtype:
    if name not in _DTYPES:
        raise ModelLoadError(f"{file} holds {name!r} tensors, which vit_demo does not read: use float32, float16 or bfloat16 weights.")
    return _DTYPES[name]


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

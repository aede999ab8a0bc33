"""The README's front matter, which configures the Space: it parses with huggingface_hub's own card tools, and
its preload_from_hub list holds exactly the files the loader reads for the default model and the curated list.

Each preloaded repo is laid out in a Hugging Face cache with only its preloaded files (from the layout its
library writes: transformers' save_pretrained, timm's save_for_hf) and loaded by repo id with HF_HUB_OFFLINE=1:
it must load with them, and fail without any one of them, so every file listed is one the loader reads.
"""

from __future__ import annotations

import shutil

import gradio
import pytest
from huggingface_hub import RepoCard, SpaceCard, SpaceCardData

from conftest import ROOT, lay_out_hub_cache, make_timm, make_transformers
from vit_demo.hub import ModelLoadError, load_checkpoint
from vit_demo.registry import CURATED, DEFAULT_MODEL

README = ROOT / "README.md"


@pytest.fixture(scope="module")
def card() -> SpaceCard:
    return SpaceCard.load(README)


def preloads(card) -> dict[str, list[str]]:
    """preload_from_hub as {repo_id: [file names]} ("repo file1,file2 [commit]" per entry)."""
    entries = card.data.to_dict()["preload_from_hub"]
    out = {}
    for entry in entries:
        repo, files, *_ = entry.split()
        out[repo] = files.split(",")
    return out


def test_front_matter_is_a_valid_space_card(card):
    RepoCard.load(README)  # yaml.safe_load of the block, as the Hub does
    data = card.data
    assert isinstance(data, SpaceCardData)
    assert data.sdk == "gradio" and data.sdk_version == gradio.__version__
    assert (ROOT / data.app_file).is_file()
    short = data.to_dict()["short_description"]
    assert isinstance(short, str) and 0 < len(short) <= 60, short  # the Hub refuses longer ones
    assert set(data.models) >= set(CURATED)


def test_preload_covers_the_default_model_and_the_curated_list(card):
    assert set(preloads(card)) == set(CURATED) | {DEFAULT_MODEL}


@pytest.fixture(scope="module")
def layouts(tmp_path_factory) -> dict[str, object]:
    """One tiny checkpoint per format, saved as its library publishes it."""
    base = tmp_path_factory.mktemp("layouts")
    return {
        "transformers": make_transformers(base / "vit").path,
        "distilled": make_transformers(base / "deit-distilled", distilled=True).path,
        "timm": make_timm(base / "timm").path,
    }


def _layout_of(repo_id: str) -> str:
    if repo_id.startswith("timm/"):
        return "timm"
    return "distilled" if "distilled" in repo_id else "transformers"


def test_preloaded_files_are_exactly_what_the_loader_reads(card, layouts, offline_hub):
    for repo_id, files in preloads(card).items():
        folder = layouts[_layout_of(repo_id)]
        written = {p.name for p in folder.iterdir()}
        assert set(files) <= written, f"{repo_id}: {sorted(set(files) - written)} is not in a {_layout_of(repo_id)} repo"
        lay_out_hub_cache(offline_hub, repo_id, folder, only=tuple(files))
        ckpt = load_checkpoint(repo_id)  # offline: only the preloaded files are there
        assert ckpt.format == ("timm" if _layout_of(repo_id) == "timm" else "transformers"), repo_id
        shutil.rmtree(offline_hub / "hub" / f"models--{repo_id.replace('/', '--')}")
        for missing in files:  # without any one of them the offline load fails: each is one the loader reads
            lay_out_hub_cache(offline_hub, repo_id, folder, only=tuple(f for f in files if f != missing))
            with pytest.raises(ModelLoadError):
                load_checkpoint(repo_id)
            shutil.rmtree(offline_hub / "hub" / f"models--{repo_id.replace('/', '--')}")

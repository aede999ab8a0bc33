"""A checkpoint is untrusted input: its config values, preprocessing sizes, weight names and downloads are checked
before anything is built or downloaded in full, and its text is shown as text.

Everything runs against checkpoints made here, served by a Hub on loopback (conftest's fake_hub) or read from a
folder or a cache laid out by hand. Memory is measured as the growth of this process's peak resident set
(VmHWM, reset through /proc/self/clear_refs); times against a normal load of the same checkpoint.
"""

from __future__ import annotations

import html
import json
import re
import shutil
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import lay_out_hub_cache, make_timm, make_torchvision, make_transformers
from vit_demo import ModelLoadError, hub, load_classifier
from vit_demo import registry as registry_module
from vit_demo.hub import load_checkpoint
from vit_demo.registry import ModelsBusy, Registry
from vit_demo.ui import checks

MB = 1024**2


# --- helpers --------------------------------------------------------------------------------------------------


def _status(field: str) -> int:
    """A field of /proc/self/status, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(field)


def peak_growth(fn) -> tuple[int, float, object]:
    """(growth of the peak RSS, seconds, the exception or result) while `fn` runs."""
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    before = _status("VmRSS")
    start = time.perf_counter()
    try:
        outcome = fn()
    except Exception as e:  # noqa: BLE001 - returned for the test to inspect
        outcome = e
    return _status("VmHWM") - before, time.perf_counter() - start, outcome


def edit_json(path: Path, **changes) -> None:
    """Sets keys of a JSON file; "a.b" sets key b of object a."""
    data = json.loads(path.read_text()) if path.exists() else {}
    for key, value in changes.items():
        target = data
        *parents, last = key.split(".")
        for p in parents:
            target = target.setdefault(p, {})
        target[last] = value
    path.write_text(json.dumps(data))


def refusal(source, **kw) -> str:
    with pytest.raises(ModelLoadError) as info:
        load_checkpoint(source, **kw)
    message = str(info.value)
    assert "\n" not in message and "Traceback" not in message, message
    return message


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink()) if path.exists() else 0


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A small transformers ViT (2 layers, 4 heads, 32 px in 8-px patches) and a small timm one, saved once."""
    tmp = tmp_path_factory.mktemp("small")
    return {"transformers": make_transformers(tmp / "transformers").path,
            "timm": make_timm(tmp / "timm", "vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1).path}


def copy_of(small, fmt: str, tmp_path: Path) -> Path:
    out = tmp_path / fmt
    shutil.copytree(small[fmt], out)
    return out


# --- every bad value gets its sentence --------------------------------------------------------------------------

NAN = float("nan")
BAD_VALUES = [
    # (format, file, key as edited, value, the key as the sentence names it)
    ("transformers", "config.json", "num_attention_heads", "4", "num_attention_heads"),
    ("transformers", "config.json", "num_attention_heads", [4], "num_attention_heads"),
    ("transformers", "config.json", "num_attention_heads", 0, "num_attention_heads"),
    ("transformers", "config.json", "num_attention_heads", True, "num_attention_heads"),
    ("transformers", "config.json", "num_attention_heads", 10**9, "num_attention_heads"),
    ("transformers", "config.json", "layer_norm_eps", "x", "layer_norm_eps"),
    ("transformers", "config.json", "layer_norm_eps", -1, "layer_norm_eps"),
    ("transformers", "config.json", "layer_norm_eps", 0, "layer_norm_eps"),
    ("transformers", "config.json", "layer_norm_eps", NAN, "layer_norm_eps"),
    ("transformers", "config.json", "layer_norm_eps", 1e300, "layer_norm_eps"),
    ("transformers", "config.json", "hidden_act", ["gelu"], "hidden_act"),
    ("transformers", "config.json", "model_type", {"vit": 1}, "model_type"),
    ("transformers", "config.json", "id2label", ["a", "b"], "id2label"),
    ("transformers", "config.json", "id2label", {str(i): {"name": i} for i in range(10)}, "id2label[0]"),
    ("transformers", "config.json", "id2label", {"x": "a"}, "a key of id2label"),
    ("transformers", "config.json", "id2label", {str(i): "a" * 5000 for i in range(10)}, "id2label[0]"),
    ("transformers", "config.json", "qkv_bias", "yes", "qkv_bias"),
    ("transformers", "preprocessor_config.json", "size", {"height": 0, "width": 0}, "size"),
    ("transformers", "preprocessor_config.json", "size", {"shortest_edge": 10**6}, "size"),
    ("transformers", "preprocessor_config.json", "size", {"height": 22.5, "width": 22.5}, "size"),
    ("transformers", "preprocessor_config.json", "crop_size", {"height": 5000, "width": 5000}, "crop_size"),
    ("transformers", "preprocessor_config.json", "image_std", [0, 0, 0], "image_std"),
    ("transformers", "preprocessor_config.json", "image_std", [-1, 1, 1], "image_std"),
    ("transformers", "preprocessor_config.json", "image_mean", ["a", 0, 0], "image_mean"),
    ("transformers", "preprocessor_config.json", "image_mean", [NAN, 0, 0], "image_mean"),
    ("transformers", "preprocessor_config.json", "image_mean", 0.5, "image_mean"),
    ("transformers", "preprocessor_config.json", "do_resize", "no", "do_resize"),
    ("transformers", "preprocessor_config.json", "do_normalize", 0, "do_normalize"),
    ("transformers", "preprocessor_config.json", "rescale_factor", 1, "rescale_factor"),
    ("timm", "config.json", "pretrained_cfg.crop_pct", 0, "crop_pct"),
    ("timm", "config.json", "pretrained_cfg.crop_pct", -0.5, "crop_pct"),
    ("timm", "config.json", "pretrained_cfg.crop_pct", "0.9", "crop_pct"),
    ("timm", "config.json", "pretrained_cfg.crop_pct", 1e-300, None),  # in range: the resize it makes is not
    ("timm", "config.json", "pretrained_cfg.input_size", [3, 0, 0], "input_size"),
    ("timm", "config.json", "pretrained_cfg.input_size", [3, 4096, 4096], "input_size"),
    ("timm", "config.json", "pretrained_cfg.input_size", [3, 32.5, 32], "input_size"),
    ("timm", "config.json", "pretrained_cfg.mean", [NAN, 0, 0], "mean"),
    ("timm", "config.json", "pretrained_cfg.std", [0, 0, 0], "std"),
    ("timm", "config.json", "pretrained_cfg.crop_mode", 7, "crop_mode"),
    ("timm", "config.json", "pretrained_cfg.label_names", [{"a": 1}] * 1000, "label_names[0]"),
    ("timm", "config.json", "label_names", {"0": "a"}, "label_names"),
    ("timm", "config.json", "label_names", [{"name": "a"}] * 1000, "label_names[0]"),
    ("timm", "config.json", "model_args.num_heads", "3", "model_args.num_heads"),
    ("timm", "config.json", "model_args", [1], "model_args"),
    ("timm", "config.json", "pretrained_cfg", "cfg", "pretrained_cfg"),
    ("timm", "config.json", "num_classes", -1, "num_classes"),
    ("timm", "config.json", "architecture", ["vit_tiny"], "architecture"),
]


@pytest.mark.parametrize("fmt, file, key, value, named", BAD_VALUES,
                         ids=[f"{f}-{k}={json.dumps(v)[:24]}" for f, _, k, v, _ in BAD_VALUES])
def test_every_bad_value_gets_a_sentence_naming_file_and_key(small, tmp_path, fmt, file, key, value, named):
    """A wrong type or a value out of range is a ModelLoadError naming the file, the key and what is allowed,
    never a crash later (a bare "Error" on the page) or NaN probabilities."""
    folder = copy_of(small, fmt, tmp_path)
    edit_json(folder / file, **{key: value})
    message = refusal(folder)
    assert file.split("'")[0] in message, message
    if named is None:  # refused by what the value makes (a 10^300-pixel resize), in its own sentence
        assert "resize" in message and "allowed" in message, message
    else:
        assert f"sets {named} to" in message and "allowed:" in message, message


def test_good_values_still_load(small):
    """The checks refuse nothing that the reference libraries save."""
    for folder in small.values():
        load_checkpoint(folder)


# --- sizes: refused at load, before anything is allocated ---------------------------------------------------------


def _wide_patchy(tmp_path: Path) -> Path:
    """The issue's checkpoint: 2 layers, 12 heads, 16-px patches (a 1 MB file)."""
    return make_transformers(tmp_path / "vit", "small", hidden_size=96, num_attention_heads=12, patch_size=16,
                             image_size=32, intermediate_size=192).path


def test_a_2048_pixel_preprocessor_is_refused_at_load_quickly_and_without_memory(tmp_path):
    folder = _wide_patchy(tmp_path)
    grow_ok, took_ok, clf = peak_growth(lambda: load_classifier(folder, device="cpu"))  # the same checkpoint, as saved
    assert not isinstance(clf, Exception), clf
    edit_json(folder / "preprocessor_config.json", size={"height": 2048, "width": 2048}, do_center_crop=False)
    grow, took, error = peak_growth(lambda: load_classifier(folder, device="cpu"))
    assert isinstance(error, ModelLoadError), error
    message = str(error)
    assert "preprocessor_config.json's size asks for a 2048x2048 input" in message, message
    assert "allowed: 16 to 1,024 pixels a side" in message, message
    assert grow < 100 * MB, f"the refusal grew the peak RSS by {grow / MB:.0f} MB"
    assert took < max(1.0, 3 * took_ok), f"refused in {took:.2f} s; a whole load of it takes {took_ok:.2f} s"


def test_attention_memory_past_the_budget_is_refused_with_the_figure(tmp_path, monkeypatch):
    """Within the size bounds, a model whose maps would take more than the attention budget is refused."""
    from vit_demo import checkpoint_checks

    folder = _wide_patchy(tmp_path)
    edit_json(folder / "preprocessor_config.json", size={"height": 512, "width": 512}, do_center_crop=False)
    load_checkpoint(folder)  # 1,025 tokens: 2 x 12 x 1025² x 4 x 3 bytes = 302 MB, within 2 GiB
    monkeypatch.setattr(checkpoint_checks, "ATTENTION_BUDGET_BYTES", 256 * MB)
    message = refusal(folder)
    assert "whose attention maps would take 289 MiB (2 layers x 12 heads x 1,025² tokens)" in message, message
    assert "VIT_DEMO_ATTENTION_MB" in message


def _with_stray_block(folder: Path, key: str) -> Path:
    weights = folder / "model.safetensors"
    sd = load_file(str(weights))
    sd[key] = torch.zeros(sd[next(k for k in sd if k.endswith("norm1.weight") or "layernorm_before.weight" in k)].shape)
    save_file(sd, str(weights))
    return folder


@pytest.mark.parametrize("fmt, key", [
    ("timm", "blocks.399.norm1.weight"),
    ("transformers", "vit.encoder.layer.399.layernorm_before.weight"),
    ("timm", "blocks.40.norm1.weight"),  # within the depth bound: a gap in the numbering
])
def test_a_stray_block_key_is_refused_before_any_layer_is_built(small, tmp_path, monkeypatch, fmt, key):
    from vit_demo import model

    built = []
    monkeypatch.setattr(model.Block, "__init__", lambda self, cfg: built.append(cfg) or torch.nn.Module.__init__(self))
    folder = _with_stray_block(copy_of(small, fmt, tmp_path), key)
    grow, took, error = peak_growth(lambda: load_classifier(folder, device="cpu"))
    assert isinstance(error, ModelLoadError), error
    assert "the file may be damaged or edited" in str(error), error
    assert not [cfg for cfg in built if cfg.depth > 2], "blocks were built before the refusal"
    assert grow < 100 * MB, f"the refusal grew the peak RSS by {grow / MB:.0f} MB"
    assert took < 1.0 or not built, f"refused in {took:.2f} s"


def test_a_misshapen_tensor_is_refused_from_the_header(small, tmp_path):
    folder = copy_of(small, "timm", tmp_path)
    sd = load_file(str(folder / "model.safetensors"))
    sd["blocks.0.attn.proj.weight"] = torch.zeros(5, 3)
    save_file(sd, str(folder / "model.safetensors"))
    message = refusal(folder)
    assert "blocks.0.attn.proj.weight has the shape [5, 3], the model needs [192, 192]" in message, message


def test_weights_with_nan_are_refused(small, tmp_path):
    folder = copy_of(small, "timm", tmp_path)
    sd = load_file(str(folder / "model.safetensors"))
    sd["head.weight"][0, 0] = float("nan")
    save_file(sd, str(folder / "model.safetensors"))
    assert "head.weight holds NaN or infinite values" in refusal(folder)


def test_a_model_whose_answers_are_not_numbers_gets_a_sentence(small, tmp_path):
    """Finite weights whose logits overflow: the registry refuses the model at load, with a sentence."""
    folder = copy_of(small, "timm", tmp_path)
    sd = load_file(str(folder / "model.safetensors"))
    sd["head.weight"].fill_(3e38)
    save_file(sd, str(folder / "model.safetensors"))
    reg = Registry([str(folder)], default=str(folder), device="cpu")
    with pytest.raises(ModelLoadError, match="answers that are not numbers"):
        reg.get()
    assert reg.loaded() == []


# --- the Hub: metadata first, sizes from the Hub's metadata, nothing left behind ---------------------------------


def _big_vit(tmp_path: Path, name: str = "big") -> Path:
    """A transformers ViT whose weights are about 12.6 MB (4 layers, 256 wide)."""
    return make_transformers(tmp_path / name, "small", hidden_size=256, num_hidden_layers=4, intermediate_size=1024,
                             num_attention_heads=4).path


def _written(fake_hub) -> int:
    """Bytes and files the loads left in the cache, besides huggingface_hub's marker of the cache itself."""
    files = [f for f in (fake_hub.hf_home / "hub").rglob("*") if f.is_file() and f.name != "CACHEDIR.TAG"]
    return sum(f.stat().st_size for f in files) + len(files)


def test_a_non_vit_is_refused_from_its_config_before_its_weights(fake_hub, tmp_path):
    folder = _big_vit(tmp_path)
    edit_json(folder / "config.json", model_type="llama")
    fake_hub.serve("someone/llama", folder)
    message = refusal("someone/llama")
    assert "is a 'llama' model, not a ViT" in message, message
    assert fake_hub.sent < 10 * MB, f"{fake_hub.sent / MB:.1f} MB sent"
    assert not any(p.endswith("model.safetensors") for p in fake_hub), fake_hub
    assert _written(fake_hub) == 0, "the refused download left files in the cache"


def test_weights_over_the_cap_are_refused_from_the_hubs_file_metadata(fake_hub, tmp_path, monkeypatch):
    folder = _big_vit(tmp_path)
    size = (folder / "model.safetensors").stat().st_size
    assert size > 12 * 10**6
    monkeypatch.setattr(hub, "MAX_WEIGHTS_BYTES", 10 * 10**6)
    fake_hub.serve("someone/too-big", folder)
    message = refusal("someone/too-big")
    assert f"weights file model.safetensors is {size / 1e6:,.0f} MB, more than this app downloads (10 MB" in message
    assert "VIT_DEMO_MAX_WEIGHTS_MB" in message
    assert fake_hub.sent < 10 * MB and _written(fake_hub) == 0, (fake_hub.sent, _written(fake_hub))
    monkeypatch.setattr(hub, "MAX_WEIGHTS_BYTES", 20 * 10**6)  # under the cap it downloads and loads
    assert load_checkpoint("someone/too-big").config.embed_dim == 256


def test_a_misshapen_hub_safetensors_is_refused_from_its_header(fake_hub, tmp_path):
    """The safetensors header is read with a range request: the tensors are checked before the download."""
    folder = _big_vit(tmp_path)
    sd = load_file(str(folder / "model.safetensors"))
    sd["vit.encoder.layer.3.output.dense.weight"] = torch.zeros(256, 7)
    save_file(sd, str(folder / "model.safetensors"))
    fake_hub.serve("someone/misshapen", folder)
    message = refusal("someone/misshapen")
    assert "do not fit together as a ViT (blocks.3.mlp.fc2.weight has the shape [256, 7]" in message, message
    assert fake_hub.sent < 1 * MB and _written(fake_hub) == 0, (fake_hub.sent, _written(fake_hub))


def test_a_refused_pickle_download_leaves_nothing_behind(fake_hub, tmp_path):
    """Pickles have no header to read first: downloaded, refused, and deleted from the cache again."""
    ref = make_torchvision(tmp_path / "tv", "small")
    sd = torch.load(ref.path, weights_only=True)
    sd["encoder.layers.encoder_layer_1.mlp.3.weight"] = torch.zeros(128, 3)
    torch.save(sd, ref.path)
    fake_hub.serve("someone/tv", ref.path.parent)
    assert "do not fit together as a ViT" in refusal("someone/tv")
    assert any(p.endswith(ref.path.name) for p in fake_hub), "the weights were not downloaded at all"
    assert not (fake_hub.hf_home / "hub" / "models--someone--tv").exists(), "the refused download stayed in the cache"


@pytest.mark.parametrize("file", ["preprocessor_config.json", "config.json"])
@pytest.mark.parametrize("failure", [503, 0], ids=["503", "dropped"])
def test_only_a_404_means_a_metadata_file_is_absent(fake_hub, small, tmp_path, file, failure):
    """A 503 or a dropped connection on config.json or preprocessor_config.json is a load error with a sentence,
    not "the repo has none": nothing is recorded as absent, and once the Hub answers the repo loads with its own
    preprocessing."""
    folder = copy_of(small, "transformers", tmp_path)
    edit_json(folder / "preprocessor_config.json", size={"height": 40, "width": 40}, image_mean=[0.1, 0.2, 0.3])
    fake_hub.serve("someone/vit", folder)
    fake_hub.broken[file] = failure
    with pytest.raises(ModelLoadError) as info:
        load_checkpoint("someone/vit")
    assert "The Hugging Face Hub could not be reached to download someone/vit" in str(info.value), info.value
    assert info.value.transient
    assert not list((fake_hub.hf_home / "hub").rglob(".no_exist/*/*")), "a failed request was cached as a 404"
    del fake_hub.broken[file]
    ckpt = load_checkpoint("someone/vit")
    assert ckpt.preprocess.resize == (40, 40) and ckpt.preprocess.mean == (0.1, 0.2, 0.3)


def test_half_cached_repo_with_the_hub_down_is_a_sentence_not_defaults(fake_hub, small, tmp_path):
    folder = copy_of(small, "transformers", tmp_path)
    lay_out_hub_cache(fake_hub.hf_home, "someone/half", folder, only=("model.safetensors", "config.json"))
    fake_hub.serve("someone/half", folder)
    fake_hub.broken["preprocessor_config.json"] = 503
    with pytest.raises(ModelLoadError, match="only partly in the local Hugging Face cache .no preprocessor_config.json"):
        load_checkpoint("someone/half")


@pytest.mark.parametrize("maker, name", [
    (lambda out: make_timm(out, "vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1), "vit_tiny_patch8_32.safetensors"),
    (lambda out: make_torchvision(out, "small"), "vit_b_16-c867db91.pth"),
], ids=["timm", "torchvision"])
def test_offline_a_cached_repo_with_a_non_standard_weights_name_loads(offline_hub, tmp_path, maker, name):
    """The cached snapshot's files go through the rule that picks the weights from the Hub's listing."""
    ref = maker(tmp_path / "ref")
    folder = ref.path if ref.path.is_dir() else ref.path.parent
    weights = next(f for f in folder.iterdir() if f.suffix in (".safetensors", ".pth"))
    weights.rename(folder / name)
    sha = lay_out_hub_cache(offline_hub, "someone/renamed", folder)
    for absent in {"config.json", "preprocessor_config.json"} - {f.name for f in folder.iterdir()}:
        marker = offline_hub / "hub" / "models--someone--renamed" / ".no_exist" / sha / absent  # as a 404 leaves it
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
    clf = load_classifier("someone/renamed", device="cpu")
    x = torch.randn(1, 3, ref.input_size, ref.input_size)
    with torch.no_grad():
        diff = (clf.model(x) - ref.forward(x)).abs().max().item()
    assert diff < 1e-4, diff


# --- the registry: bounded loads, busy models kept, failures remembered, the cache capped --------------------------


def test_a_model_others_use_this_minute_is_not_evicted(monkeypatch):
    loads = []
    monkeypatch.setattr(registry_module, "load_classifier", lambda name, device=None: loads.append(name) or name)
    reg = Registry(["o/a", "o/b", "o/c"], default="o/a", capacity=2)
    assert reg.get("o/a", client="ann") == "o/a" and reg.get("o/b", client="bob") == "o/b"
    with pytest.raises(ModelsBusy) as info:
        reg.get("o/c", client="cy")
    assert str(info.value).startswith("All 2 places for loaded models hold models that other visitors used within the "
                                      "last minute (o/a, o/b), so o/c cannot be loaded now")
    assert loads == ["o/a", "o/b"] and reg.loaded() == ["o/a", "o/b"]
    reg.get("o/c", client="ann")  # Ann's own model makes room for her switch; Bob's stays
    assert reg.loaded() == ["o/b", "o/c"]
    monkeypatch.setattr(reg, "busy_seconds", 0.0)  # a minute later, the least recently used goes
    reg.get("o/a", client="cy")
    assert reg.loaded() == ["o/c", "o/a"]


def test_a_refused_checkpoint_is_remembered_and_an_unreachable_hub_is_not(monkeypatch):
    calls = []

    def load(name, device=None):
        calls.append(name)
        raise ModelLoadError(f"{name} is broken", transient=name == "o/offline")

    monkeypatch.setattr(registry_module, "load_classifier", load)
    reg = Registry(["o/broken", "o/offline"], default="o/broken")
    for _ in range(3):
        with pytest.raises(ModelLoadError, match="o/broken is broken"):
            reg.get("o/broken")
        with pytest.raises(ModelLoadError, match="o/offline is broken"):
            reg.get("o/offline")
    assert calls.count("o/broken") == 1 and calls.count("o/offline") == 3, calls
    monkeypatch.setattr(registry_module, "FAILED_LOAD_SECONDS", 0.0)
    reg._failed.clear()
    with pytest.raises(ModelLoadError):
        reg.get("o/broken")
    assert calls.count("o/broken") == 2


def test_eight_concurrent_loads_of_distinct_repos_stay_within_the_budget(fake_hub, tmp_path, monkeypatch):
    """Eight clients name eight repos at once: one load runs at a time, at most `capacity` stay loaded, and the
    clients past the places that others use get ModelsBusy's sentence without a download."""
    repos = []
    for i in range(8):
        folder = _big_vit(tmp_path, f"m{i}")
        fake_hub.serve(f"someone/vit-{i}", folder)
        repos.append(f"someone/vit-{i}")
    running, peak = [0], [0]
    lock = threading.Lock()
    real = registry_module.load_classifier

    def counted(name, device=None):
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        try:
            return real(name, device=device)
        finally:
            with lock:
                running[0] -= 1

    monkeypatch.setattr(registry_module, "load_classifier", counted)
    reg = Registry([], default=repos[0], allow_any=True, capacity=3, device="cpu")
    results: dict[int, object] = {}

    def client(i):
        try:
            results[i] = reg.get(repos[i], client=f"client-{i}")
        except ModelLoadError as e:
            results[i] = e

    model_bytes = (tmp_path / "m0" / "model.safetensors").stat().st_size

    def burst():
        threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)

    grow, _, _ = peak_growth(burst)
    served = [i for i, r in results.items() if not isinstance(r, Exception)]
    busy = [i for i, r in results.items() if isinstance(r, ModelsBusy)]
    assert len(results) == 8 and len(served) + len(busy) == 8, results
    assert peak[0] == 1, f"{peak[0]} loads ran at once"
    assert len(reg.loaded()) <= 3 and len(served) >= 3, (reg.loaded(), served)
    downloaded = [r for r in repos if (fake_hub.hf_home / "hub" / f"models--{r.replace('/', '--')}").exists()]
    assert len(downloaded) == len(served), "a refused client's repo was downloaded"
    # Each loaded model takes its weights twice at most while it loads (the file and the module).
    assert grow < (3 + 1) * 2 * model_bytes + 150 * MB, f"peak RSS grew by {grow / MB:.0f} MB"


def test_the_apps_downloads_stay_under_the_cache_cap(fake_hub, tmp_path, monkeypatch):
    repos = []
    for i in range(5):
        fake_hub.serve(f"someone/cached-{i}", _big_vit(tmp_path, f"c{i}"))
        repos.append(f"someone/cached-{i}")
    size = folder_bytes(tmp_path / "c0")
    monkeypatch.setattr(hub, "MAX_WEIGHTS_BYTES", size)
    cap = 3 * size + size // 2
    reg = Registry([], default=repos[0], allow_any=True, capacity=2, device="cpu", busy_seconds=0.0, cache_bytes=cap)
    for name in repos:
        reg.get(name)
        assert hub.cache_bytes() <= cap, f"{hub.cache_bytes() / MB:.1f} MB cached, cap {cap / MB:.1f} MB"
        assert set(reg.loaded()) <= {r for r in repos if hub.cached_weights(r) is not None}, "a loaded repo was deleted"
    assert hub.cached_weights(repos[-1]) is not None and hub.cached_weights(repos[1]) is None


# --- text: one escape for every sink ------------------------------------------------------------------------------

HOSTILE = [
    '<img src="http://127.0.0.1:9/leak.png">',
    "![leak](http://127.0.0.1:9/md.png)",
    "cell | split | here",
    '<form action="http://127.0.0.1:9/"><input type="password" name="p"></form>',
    "**bold** _em_ `code` [link](http://127.0.0.1:9/l) www.example.com",
    "line\n\n# heading\n| a | b |\n|---|---|",
    "&amp; &lt;script&gt; \\| \\*",
]


@pytest.mark.parametrize("label", HOSTILE)
def test_the_escape_leaves_no_markup_and_keeps_the_text(label):
    shown = checks.text(label)
    bare = re.sub(r"&#\d+;", "", shown)  # what is left besides numeric entities: letters, digits and spaces
    assert not set(bare) & set("<>|[]()!*_`#&;\\\n"), shown
    assert html.unescape(shown) == " ".join(label.split())


def test_refusals_quote_markup_as_text():
    error = checks.refusal("'<img src=x>' is not one of this model's classes")
    assert "<img" not in error.message and html.unescape(error.message).startswith("'<img src=x>'")


def test_attention_budget_is_shared_by_concurrent_maps(small, monkeypatch):
    """Maps past the attention budget wait for room: the memory held at once never exceeds it."""
    from vit_demo.checkpoint_checks import attention_bytes
    from vit_demo.ui import maps
    from vit_demo.ui.guard import DecodeBudget

    clf = load_classifier(small["transformers"], device="cpu")
    one = attention_bytes(clf.config, clf.preprocessor.cfg.input_size)
    assert one == 3 * 2 * 4 * (1 + (32 // 8) ** 2) ** 2 * 4  # 3 copies x 2 layers x 4 heads x 17² tokens x 4 bytes
    monkeypatch.setattr(maps, "ATTENTION", DecodeBudget(int(2.5 * one)))
    inside, most = [0], [0]
    lock = threading.Lock()

    def work():
        with maps.attending(clf):
            with lock:
                inside[0] += 1
                most[0] = max(most[0], inside[0])
            time.sleep(0.02)
            with lock:
                inside[0] -= 1

    threads = [threading.Thread(target=work) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert most[0] <= 2 and maps.ATTENTION.peak <= maps.ATTENTION.total and maps.ATTENTION.used == 0, most

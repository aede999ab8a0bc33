"""Every way a checkpoint can fail to load gives one ModelLoadError whose message says what to do.

Each message that loading can raise in hub.py, convert.py and classifier.py has a test here (convert's
to_transformers and to_torchvision errors are for exporting, not loading, and are left to their callers).
"""

import pickle
import time

import pytest
import torch
from huggingface_hub import constants

from conftest import free_port, lay_out_hub_cache, make_timm, make_transformers
from vit_demo import ModelLoadError, load_classifier


@pytest.fixture
def empty_online_cache(tmp_path, monkeypatch):
    """No cached models and HF_HUB_OFFLINE off: every load goes to the Hub endpoint."""
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


def _error(source, **kw) -> str:
    with pytest.raises(ModelLoadError) as info:
        load_classifier(source, device="cpu", **kw)
    message = str(info.value)
    assert "\n" not in message and "Traceback" not in message
    return message


def test_missing_repo_on_the_hub(fake_hub):
    assert "No model someone/no-such-vit was found on the Hugging Face Hub" in _error("someone/no-such-vit")


def test_gated_repo_without_token(fake_hub):
    message = _error("someone/gated-vit")
    assert "gated" in message and "HF_TOKEN" in message


def test_unreachable_hub_fails_fast(monkeypatch, empty_online_cache):
    import socket

    with socket.socket() as s:  # a port nothing listens on: connections are refused at once
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    start = time.monotonic()
    message = _error("google/vit-base-patch16-224")
    elapsed = time.monotonic() - start
    assert "could not be reached" in message
    assert elapsed < 5, f"took {elapsed:.1f} s: huggingface_hub's retries were not avoided"


def test_not_cached_while_offline(offline_hub):
    assert "not in the local Hugging Face cache and HF_HUB_OFFLINE is set" in _error("google/vit-base-patch16-224")


def test_missing_local_path(tmp_path):
    assert "No file or folder" in _error(str(tmp_path / "nowhere" / "model"))
    assert "No file or folder" in _error("./missing.safetensors")
    assert "No file or folder at vit-base-patch16-224: check the path (Hub ids have the form org/name)." in _error("vit-base-patch16-224")


def test_folder_without_weights(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert "holds no weights file" in _error(tmp_path)


def test_not_a_vit_resnet(tmp_path):
    from transformers import ResNetConfig, ResNetForImageClassification

    ResNetForImageClassification(ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=3)).save_pretrained(tmp_path)
    assert "is a 'resnet' model, not a ViT" in _error(tmp_path)


def test_not_a_vit_timm_resnet(tmp_path):
    import timm
    from timm.models import save_for_hf

    save_for_hf(timm.create_model("resnet10t", pretrained=False, num_classes=3), str(tmp_path), safe_serialization=True)
    assert "not a ViT" in _error(tmp_path)


def test_weights_of_something_else(tmp_path):
    from safetensors.torch import save_file

    save_file({"conv1.weight": torch.zeros(8, 3, 3, 3)}, str(tmp_path / "model.safetensors"))
    assert "not a ViT in any supported format" in _error(tmp_path)


def test_corrupt_safetensors(tmp_path):
    ref = make_transformers(tmp_path, "small")
    data = (ref.path / "model.safetensors").read_bytes()
    (ref.path / "model.safetensors").write_bytes(data[: len(data) // 2])
    assert "not a readable safetensors file" in _error(ref.path)


def test_shapes_that_do_not_fit(tmp_path):
    from safetensors.torch import load_file, save_file

    ref = make_timm(tmp_path, "vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2)
    sd = load_file(str(ref.path / "model.safetensors"))
    sd["blocks.1.mlp.fc1.weight"] = torch.zeros(100, 192)
    save_file(sd, str(ref.path / "model.safetensors"))
    assert "do not fit together as a ViT" in _error(ref.path)


class Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_pickle_that_carries_code_is_refused(tmp_path, capsys):
    path = tmp_path / "vit_b_16.pth"
    with open(path, "wb") as f:
        pickle.dump({"class_token": Payload()}, f)
    assert "was refused" in _error(path)
    assert "this must never run" not in capsys.readouterr().out


# --- a repo only partly in the Hugging Face cache ------------------------------------------------------------


@pytest.mark.parametrize("cached", [("model.safetensors",), ("model.safetensors", "config.json")], ids=["weights only", "no preprocessor_config.json"])
def test_half_cached_repo_while_offline(tmp_path, offline_hub, cached):
    """Loading with the defaults would preprocess wrongly (ImageNet mean and crop for an augreg timm model)."""
    ref = make_transformers(tmp_path / "ckpt", "small", distilled=True)
    lay_out_hub_cache(offline_hub, "facebook/deit-test", ref.path, only=cached)
    missing = "config.json" if len(cached) == 1 else "preprocessor_config.json"
    message = _error("facebook/deit-test")
    assert f"facebook/deit-test is only partly in the local Hugging Face cache (no {missing})" in message, message
    assert "HF_HUB_OFFLINE" in message


def test_half_cached_timm_repo_while_offline(tmp_path, offline_hub):
    repo = "timm/vit_small_patch16_224.augreg_in21k_ft_in1k"
    ref = make_timm(tmp_path / "ckpt", repo.split("/")[1], depth=1)
    lay_out_hub_cache(offline_hub, repo, ref.path, only=("model.safetensors",))
    assert f"{repo} is only partly in the local Hugging Face cache (no config.json)" in _error(repo)


def test_half_cached_repo_with_the_hub_unreachable_fails_fast(tmp_path, monkeypatch, fake_hub):
    ref = make_transformers(tmp_path / "ckpt", "small")
    lay_out_hub_cache(fake_hub.hf_home, "google/vit-test", ref.path, only=("model.safetensors", "config.json"))
    port = free_port()  # nothing listens there
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", f"http://127.0.0.1:{port}/{{repo_id}}/resolve/{{revision}}/{{filename}}")
    start = time.monotonic()
    message = _error("google/vit-test")
    assert "only partly in the local Hugging Face cache (no preprocessor_config.json)" in message, message
    assert "could not be reached" in message
    assert time.monotonic() - start < 5, "huggingface_hub's retries were not avoided"


# --- preprocessing settings vit_demo cannot follow -----------------------------------------------------------


def _edit_json(path, **changes):
    import json

    data = json.loads(path.read_text())
    for key, value in changes.items():
        target = data
        *parents, last = key.split(".")
        for p in parents:
            target = target[p]
        target[last] = value
    path.write_text(json.dumps(data))


def test_unknown_timm_crop_mode(tmp_path):
    ref = make_timm(tmp_path, "vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1)
    _edit_json(ref.path / "config.json", **{"pretrained_cfg.crop_mode": "border"})
    assert "timm crop_mode 'border' is not supported (center and squash are)" in _error(ref.path)


def test_unknown_timm_interpolation(tmp_path):
    ref = make_timm(tmp_path, "vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1)
    _edit_json(ref.path / "config.json", **{"pretrained_cfg.interpolation": "random"})
    assert "interpolation 'random' is not supported" in _error(ref.path)


@pytest.mark.parametrize("change, expected", [
    ({"resample": 7}, "resample 7 is not supported"),
    ({"size": {"longest_edge": 224}}, "size {'longest_edge': 224} is not supported"),
    ({"image_mean": [0.5, 0.5]}, "mean and std need 3 values (one per channel), not 2 and 3"),
])
def test_unsupported_transformers_preprocessing(tmp_path, change, expected):
    ref = make_transformers(tmp_path, "small")
    _edit_json(ref.path / "preprocessor_config.json", **change)
    message = _error(ref.path)
    assert "preprocessor_config.json" in message and expected in message, message


def test_config_that_is_not_an_object(tmp_path):
    ref = make_transformers(tmp_path, "small")
    (ref.path / "config.json").write_text("[1, 2, 3]")
    assert "config.json is not a JSON object" in _error(ref.path)


def test_heads_that_do_not_divide_the_width(tmp_path):
    ref = make_transformers(tmp_path, "small")  # 64 channels
    _edit_json(ref.path / "config.json", num_attention_heads=5)
    assert "64 channels cannot be split into 5 attention heads" in _error(ref.path)


# --- the other messages of hub.py, convert.py and classifier.py -----------------------------------------------


def test_transformers_weights_without_config(tmp_path):
    ref = make_transformers(tmp_path, "small")
    (ref.path / "config.json").unlink()
    assert "has transformers weights but no config.json" in _error(ref.path)


def test_not_a_valid_hub_id(offline_hub):
    assert "'org/not a valid id!' is neither a local path nor a valid Hub model id" in _error("org/not a valid id!")


def test_missing_revision(fake_hub):
    assert "someone/vit has no revision 'no-such-revision'" in _error("someone/vit", revision="no-such-revision")


def test_several_weights_files(tmp_path):
    from safetensors.torch import save_file

    for name in ("a.safetensors", "b.safetensors"):
        save_file({"x": torch.zeros(1)}, str(tmp_path / name))
    assert "holds several weights files (a.safetensors, b.safetensors): pass the path of one of them." in _error(tmp_path)


def test_config_that_is_not_json(tmp_path):
    ref = make_transformers(tmp_path, "small")
    (ref.path / "config.json").write_text("{not json")
    assert "config.json is not valid JSON" in _error(ref.path)


@pytest.mark.parametrize("damage", ["truncated", "not a pickle"])
def test_unreadable_pytorch_file(tmp_path, damage):
    path = tmp_path / "vit_b_16.pth"
    torch.save({"class_token": torch.zeros(1, 1, 8)}, path)
    path.write_bytes(path.read_bytes()[:100] if damage == "truncated" else b"these are not weights\n" * 10)
    assert "vit_b_16.pth is not a readable PyTorch weights file: download it again." in _error(path)


def test_pickle_of_something_other_than_tensors(tmp_path):
    torch.save({"class_token": [1, 2, 3]}, tmp_path / "vit_b_16.pth")
    assert "vit_b_16.pth is not a state dict of tensors" in _error(tmp_path / "vit_b_16.pth")


def test_weights_without_the_shape_of_a_vit(tmp_path):
    from safetensors.torch import load_file, save_file

    ref = make_timm(tmp_path, "vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1)
    sd = load_file(str(ref.path / "model.safetensors"))
    del sd["pos_embed"]
    save_file(sd, str(ref.path / "model.safetensors"))
    assert "The weights do not have the shape of a ViT (no 'pos_embed')" in _error(ref.path)


def test_unsupported_activation(tmp_path):
    ref = make_transformers(tmp_path, "small", hidden_act="relu")
    assert "Activation 'relu' is not supported" in _error(ref.path)


def test_missing_and_unexpected_weights(tmp_path):
    from safetensors.torch import load_file, save_file

    ref = make_timm(tmp_path, "vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1)
    sd = load_file(str(ref.path / "model.safetensors"))
    del sd["norm.bias"]
    sd["blocks.0.attn.q_norm.weight"] = torch.ones(64)
    save_file(sd, str(ref.path / "model.safetensors"))
    message = _error(ref.path)
    assert "does not fit a ViT: missing norm.bias, unexpected blocks.0.attn.q_norm.weight" in message, message


def test_preprocessing_settings_that_cannot_be_read(tmp_path):
    ref = make_timm(tmp_path, "vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1)
    _edit_json(ref.path / "config.json", **{"pretrained_cfg.input_size": [32, 32]})
    assert "has preprocessing settings vit_demo cannot read (config.json's pretrained_cfg: ValueError" in _error(ref.path)

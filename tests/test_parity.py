"""vit_demo's ViT gives the same logits as each reference library on the same weights (max abs diff <= 1e-4).

Every checkpoint is the reference library's own model with random weights, saved the way that library
publishes to the Hub, and loaded back through `load_classifier`.
"""

import pytest
import torch

from conftest import assert_close, lay_out_hub_cache, make_timm, make_torchvision, make_transformers
from vit_demo import ModelLoadError, load_classifier

ATOL = 1e-4
# On a GPU too, where there is one: float32 there, with TensorFloat-32 off (it rounds products to 10 bits).
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture
def exact_float32():
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn

CASES = {
    "transformers-vit-small": lambda d: make_transformers(d, "small"),
    "transformers-vit-B16": lambda d: make_transformers(d, "base"),
    "transformers-deit-distilled-small": lambda d: make_transformers(d, "small", distilled=True),
    "transformers-deit-distilled-B16": lambda d: make_transformers(d, "base", distilled=True),
    "transformers-vit-tanh-gelu-eps1e-6": lambda d: make_transformers(d, "small", hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6),
    "timm-vit-small": lambda d: make_timm(d, "vit_small_patch16_224", img_size=32, patch_size=8, depth=2, embed_dim=64, num_heads=4, num_classes=10),
    "timm-vit-B16": lambda d: make_timm(d, "vit_base_patch16_224"),
    "timm-vit-avgpool": lambda d: make_timm(d, "vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, global_pool="avg", num_classes=10),
    "timm-deit-distilled-small": lambda d: make_timm(d, "deit_tiny_distilled_patch16_224", img_size=32, patch_size=8, depth=2),
    "timm-deit-distilled-B16": lambda d: make_timm(d, "deit_base_distilled_patch16_224"),
    "torchvision-small": lambda d: make_torchvision(d, "small"),
    "torchvision-small-safetensors": lambda d: make_torchvision(d, "small", suffix=".safetensors"),
    "torchvision-vit_b_16": lambda d: make_torchvision(d, "base", "vit_b_16"),
    "torchvision-vit_b_32": lambda d: make_torchvision(d, "base", "vit_b_32"),
    "torchvision-vit_l_32": lambda d: make_torchvision(d, "base", "vit_l_32"),
}


def _compare(ref, clf, what, seed=0):
    x = torch.randn(2, ref.in_chans, ref.input_size, ref.input_size, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        expected = ref.forward(x)
        actual = clf.model(x.to(clf.device)).cpu()
    return assert_close(actual, expected, ATOL, what)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES)
def test_logits_match_reference(case, device, tmp_path, exact_float32):
    ref = CASES[case](tmp_path / "ckpt")
    clf = load_classifier(ref.path, device=device, dtype=torch.float32)
    assert next(clf.model.parameters()).dtype == torch.float32
    _compare(ref, clf, f"{case} on {device}")
    assert len(clf.labels) == clf.config.num_classes


@pytest.mark.parametrize("arch", ["vit_l_16", "vit_h_14"])
def test_torchvision_large_sizes_read_from_shapes(arch, tmp_path):
    """ViT-L/16 and ViT-H/14: width, depth, patch and heads come from the tensors and torchvision's sizes."""
    expected = {"vit_l_16": (1024, 24, 16, 16), "vit_h_14": (1280, 32, 16, 14)}[arch]
    ref = make_torchvision(tmp_path, "base", arch, suffix=".safetensors")
    clf = load_classifier(ref.path, device="cpu")
    c = clf.config
    assert (c.embed_dim, c.depth, c.num_heads, c.patch_size) == expected
    assert (c.img_size, c.num_classes) == (224, 1000)
    _compare(ref, clf, arch)


def test_hub_repo_id_through_offline_cache(tmp_path, offline_hub):
    """The real hf_hub_download path: a repo id resolved from a Hugging Face cache, HF_HUB_OFFLINE=1."""
    ref = make_transformers(tmp_path / "ckpt", "small", id2label={i: f"kind {i}" for i in range(10)})
    lay_out_hub_cache(offline_hub, "google/vit-test-small", ref.path)
    clf = load_classifier("google/vit-test-small", device="cpu")
    _compare(ref, clf, "hub cache")
    assert clf.labels == [f"kind {i}" for i in range(10)]
    assert clf.format == "transformers"


def test_timm_repo_id_through_offline_cache(tmp_path, offline_hub):
    ref = make_timm(tmp_path / "ckpt", "deit_tiny_distilled_patch16_224", img_size=32, patch_size=8, depth=2)
    sha = lay_out_hub_cache(offline_hub, "timm/deit_tiny_distilled_test", ref.path)
    clf = load_classifier("timm/deit_tiny_distilled_test", revision=sha, device="cpu")
    _compare(ref, clf, "timm hub cache")
    assert clf.config.distilled and clf.config.num_prefix_tokens == 2


def test_labels_default_to_imagenet_or_class_n(tmp_path):
    timm_ref = make_timm(tmp_path / "timm", "vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1)
    labels = load_classifier(timm_ref.path, device="cpu").labels
    assert len(labels) == 1000 and labels[0] == "tench" and labels[281] == "tabby"
    tv = make_torchvision(tmp_path / "tv", "small")
    assert load_classifier(tv.path, device="cpu").labels == [f"class_{i}" for i in range(10)]
    # A folder holding a single weights file loads too.
    assert load_classifier(tv.path.parent, device="cpu").config.num_classes == 10


def test_predict_returns_sorted_topk_probabilities(tmp_path, photo):
    ref = make_transformers(tmp_path / "ckpt", "small")
    clf = load_classifier(ref.path, device="cpu")
    top = clf.predict(photo, k=3)
    assert len(top) == 3
    scores = [s for _, s in top]
    assert scores == sorted(scores, reverse=True) and 0 < sum(scores) <= 1 + 1e-6
    with torch.no_grad():
        probs = ref.forward(clf.preprocess(photo)).softmax(-1)[0]
    assert_close(torch.tensor(scores), probs.topk(3).values, 1e-5, "top-3 probabilities")
    assert [label for label, _ in top] == [clf.labels[i] for i in probs.topk(3).indices.tolist()]
    assert len(clf.predict(photo, k=50)) == 10  # k is capped at the number of classes


@pytest.mark.parametrize("kwargs, sentence", [
    (dict(reg_tokens=4), "It has 4 register tokens (timm's reg_token), which vit_demo's ViT does not implement: pick a ViT without registers."),
    (dict(class_token=False, global_pool="avg"), "It has no class token (timm's class_token=False), which vit_demo's ViT needs: pick a ViT with a class token."),
], ids=["registers", "no-class-token"])
def test_timm_vits_vit_demo_does_not_implement_are_refused_plainly(tmp_path, kwargs, sentence):
    """Not "damaged or edited": what the checkpoint has that vit_demo's ViT does not, and what to do."""
    ref = make_timm(tmp_path / "ckpt", "vit_small_patch16_224", img_size=32, patch_size=8, depth=1, **kwargs)
    with pytest.raises(ModelLoadError) as e:
        load_classifier(ref.path, device="cpu")
    assert sentence in str(e.value) and "damaged" not in str(e.value), str(e.value)

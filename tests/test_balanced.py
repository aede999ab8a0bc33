"""Balanced gradients (Mehri et al. 2025, "LibraGrad"): the forward pass unchanged, the maps complete, and
input x gradient equal to an independent implementation (LXT's CP-LRP, PyPI `lxt`).

- With `model.balanced_gradients()` on, the logits are the same to the bit, on both attention paths, for a
  transformers ViT, a distilled DeiT and an average-pooled timm ViT.
- libra_fullgrad's patch sum, plus the prefix tokens' part and the head's bias, is the target logit within
  1e-4 of it, on a full-width ViT-B/16 (two blocks: the rules act per block), a distilled DeiT, an average-pooled
  ViT and the bundled model.
- input_x_gradient equals LXT's CP-LRP without the gamma rule (the same three detach rules, applied by LXT to
  torchvision's ViT modules) on the same weights, within 1e-4 of the map's largest value.
"""

import sys
import types
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import assert_close, make_timm, make_torchvision, make_transformers, randomize_
from vit_demo import ViTConfig, VisionTransformer, attribution, load_classifier
from vit_demo import explain as ex
from vit_demo.classifier import Classifier
from vit_demo.hub import Checkpoint
from vit_demo.model import balanced_gradients
from vit_demo.preprocess import PreprocessConfig

BUNDLED = Path(__file__).resolve().parent.parent / "vit_demo" / "weights" / "vit-fashion-mnist"
SHOE = Path(__file__).resolve().parent.parent / "examples" / "fashion-mnist-ankle-boot-0.png"


def references(tmp_path):
    yield "transformers ViT", make_transformers(tmp_path / "vit", "small")
    yield "distilled DeiT", make_transformers(tmp_path / "deit", "small", distilled=True)
    yield "timm, average pooling", make_timm(tmp_path / "avg", "vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2,
                                             global_pool="avg", num_classes=10)


def test_the_forward_pass_is_unchanged_to_the_bit(tmp_path, photo):
    for name, ref in references(tmp_path):
        clf = load_classifier(ref.path, device="cpu", dtype=torch.float32)
        x = clf.preprocess(photo)
        with torch.no_grad():
            plain, (plain_explicit, plain_attns) = clf.model(x), clf.model(x, return_attn=True)
        for grad in (False, True):
            with torch.set_grad_enabled(grad), balanced_gradients([]):
                balanced = clf.model(x)
                balanced_explicit, attns = clf.model(x, return_attn=True)
            assert torch.equal(balanced, plain), f"{name}: fused path, grad {grad}"
            assert torch.equal(balanced_explicit, plain_explicit), f"{name}: explicit path, grad {grad}"
            assert all(torch.equal(a, b) for a, b in zip(attns, plain_attns)), name
        # Outside the context nothing is left switched on: the plain gradient flows through the softmax again.
        with torch.enable_grad():
            _, attns = clf.model(x, return_attn=True)
        assert attns[0].grad_fn is not None, name


def test_the_balanced_gradient_differs_from_the_plain_one(tmp_path, photo):
    ref = make_transformers(tmp_path / "vit", "small")
    clf = load_classifier(ref.path, device="cpu", dtype=torch.float32)
    x = clf.preprocess(photo)
    plain = attribution.trace(clf.model, x, [3], "plain")
    balanced = attribution.trace(clf.model, x, [3], "balanced")
    assert torch.equal(plain.logits, balanced.logits)
    diff = max((a - b).abs().max().item() for a, b in zip(plain.grads, balanced.grads))
    assert diff > 1e-4 * plain.grads[-1].abs().max().item(), "the switch changes the backward pass"


def completeness_error(clf: Classifier, image, target=None) -> tuple[float, float]:
    """(|patches + prefix + bias - logit|, |logit|) of libra_fullgrad for one image."""
    _, m, t, logits, traces = attribution.maps(clf, image, "libra_fullgrad", target, None)
    parts = ex.completeness(traces.tokens, float(traces.rest), float(logits[t]), clf.config.num_prefix_tokens)
    assert parts["patches"] == pytest.approx(float(m.sum()), rel=1e-5), "the map is the patches' part"
    total = torch.tensor([parts["patches"], parts["prefix"], parts["bias"]], dtype=torch.float64).sum().item()
    return abs(total - parts["logit"]), abs(parts["logit"])


def vit_b16_two_blocks() -> Classifier:
    """ViT-B/16 at full width (768, 12 heads, MLP 3072, 224 px) with two blocks, every weight and bias random."""
    cfg = ViTConfig(depth=2)
    model = randomize_(VisionTransformer(cfg), seed=3)
    with torch.no_grad():
        for p in model.parameters():  # larger weights than ViT's init, so the logits are far from 0
            p.mul_(1 + 4 * (p.ndim > 1))
    ckpt = Checkpoint(model.state_dict(), cfg, PreprocessConfig(), [f"class {i}" for i in range(1000)], "timm", "ViT-B/16, 2 blocks")
    return Classifier(ckpt, device="cpu", dtype=torch.float32)


def test_libra_fullgrad_adds_up_to_the_logit(tmp_path, photo):
    cases = [("ViT-B/16 (2 blocks)", vit_b16_two_blocks(), photo, [None, 7]),
             ("bundled", load_classifier(BUNDLED, device="cpu", dtype=torch.float32), Image.open(SHOE), [None, 0, 3])]
    for name, ref in references(tmp_path):
        clf = load_classifier(ref.path, device="cpu", dtype=torch.float32)
        with torch.no_grad():  # random weights: another class than the top one, of a logit far enough from 0
            logits = clf.model(clf.preprocess(photo))[0]
        cases.append((name, clf, photo, [None, int(logits.abs().argsort(descending=True)[1])]))
    for name, clf, image, targets in cases:
        for target in targets:
            err, logit = completeness_error(clf, image, target)
            print(f"{name}, class {target}: |sum - logit| {err:.2e}, |logit| {logit:.3g}")
            assert logit > 1e-2, f"{name}: a logit this close to 0 tests nothing"
            assert err <= 1e-4 * logit, f"{name}, class {target}: the parts miss the logit by {err:.3g} of {logit:.3g}"


def test_completeness_is_in_the_faithfulness_answer():
    clf = load_classifier(BUNDLED, device="cpu", dtype=torch.float32)
    shoe = Image.open(SHOE)
    r = clf.faithfulness(shoe, "libra_fullgrad", steps=7)
    c = r["completeness"]
    logits = clf.model(clf.preprocess(shoe))[0]
    assert c["logit"] == pytest.approx(float(logits[r["target_index"]]), rel=1e-5)
    assert c["patches"] + c["prefix"] + c["bias"] == pytest.approx(c["logit"], rel=1e-4)
    assert c["share"] == pytest.approx(c["patches"] / c["logit"])
    assert "completeness" not in clf.faithfulness(shoe, "relevance", steps=7)


# --- LXT, the independent implementation --------------------------------------------------------------------------


def lxt_patches(monkeypatch):
    """LXT's efficient patches, imported without lxt.efficient's package file (it imports its BERT patches, which
    need a transformers older than this one)."""
    import lxt  # requirements-dev.txt

    pkg = types.ModuleType("lxt.efficient")
    pkg.__path__ = [str(Path(lxt.__file__).parent / "efficient")]
    monkeypatch.setitem(sys.modules, "lxt.efficient", pkg)
    monkeypatch.delitem(sys.modules, "lxt.efficient.patches", raising=False)
    monkeypatch.delitem(sys.modules, "lxt.efficient.rules", raising=False)
    import lxt.efficient.patches as patches

    return patches


def cp_lrp(model: torch.nn.Module, patches) -> torch.nn.Module:
    """LXT's CP-LRP map for torchvision's ViT (lxt.efficient.models.vit_torch.cp_LRP), applied to this model's
    modules only, not to the torch classes for the whole process: LayerNorm's variance, the softmax's query and key,
    and GELU's gate become constants to the gradient. No gamma rule (that is a zennit patch of the linear layers)."""
    for m in model.modules():
        if isinstance(m, torch.nn.LayerNorm):
            m.forward = types.MethodType(patches.layer_norm_forward, m)
        elif isinstance(m, torch.nn.GELU):
            m.original_forward = m.forward
            m.forward = types.MethodType(patches.non_linear_forward, m)
        elif isinstance(m, torch.nn.MultiheadAttention):
            m.original_forward = m.forward
            m.forward = types.MethodType(patches.cp_multi_head_attention_forward, m)
    return model


def test_input_x_gradient_equals_lxt_cp_lrp(tmp_path, photo, monkeypatch):
    patches = lxt_patches(monkeypatch)
    ref = make_torchvision(tmp_path / "tv", "small")
    clf = load_classifier(ref.path, device="cpu", dtype=torch.float32)
    x = clf.preprocess(photo)
    model = cp_lrp(ref.model.eval(), patches)
    for target in (0, 5):
        xr = x.clone().requires_grad_(True)
        logits = model(xr)
        logits[0, target].backward()
        p = clf.config.patch_size
        expected = (xr.grad * x).sum(1)[0].reshape(4, p, 4, p).sum((1, 3))  # (4, 4): per patch
        ours = clf.heatmap(photo, "input_x_gradient", target=target)
        scale = expected.abs().max().item()
        diff = assert_close(ours, expected.detach(), 1e-4 * scale, f"class {target}")
        print(f"class {target}: max abs diff {diff:.2e} of {scale:.3g}")
        # The check can fail: plain gradients differ from LXT's by far more.
        plain = attribution.trace(clf.model, x, [target], "plain")
        assert plain.grads is not None
        with torch.enable_grad():
            xp = x.clone().requires_grad_(True)
            clf.model(xp)[0, target].backward()
        plain_map = (xp.grad * x).sum(1)[0].reshape(4, p, 4, p).sum((1, 3))
        assert (plain_map - expected).abs().max() > 1e-2 * scale

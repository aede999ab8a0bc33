"""Class-specific explanations: relevance (Chefer et al. 2021) and gradient rollout, against independent references.

- Relevance from `Classifier.heatmap` equals the same rule computed here in float64 from the reference libraries'
  own attention probabilities and gradients (transformers ViT and distilled DeiT, eager attention; timm with
  average pooling, attention read by a hook).
- Both rules on small tensors, worked out by hand.
- The maps depend on the class asked about, the class-agnostic ones do not, and they change when the weights are
  randomised (Adebayo et al. 2018).
"""

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from conftest import NO_FASHION_MNIST, assert_close, make_timm, make_transformers
from vit_demo import VisionTransformer, load_classifier
from vit_demo import explain as ex

BUNDLED = Path(__file__).resolve().parent.parent / "vit_demo" / "weights" / "vit-fashion-mnist"
FASHION_TEST = Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")


def T(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


def chefer_float64(attns, grads, rows, num_prefix) -> torch.Tensor:
    """The relevance rule, written out in numpy float64: R = I; R += mean_h(max(0, dA * A)) @ R; rows of R."""
    N = attns[0].shape[-1]
    R = np.eye(N)
    for a, g in zip(attns, grads):
        cam = np.clip(g.double().numpy() * a.double().numpy(), 0, None).mean(0)
        R = R + cam @ R
    return torch.from_numpy(R[rows].mean(0)[num_prefix:])


def fashion_images(n: int) -> list:
    from PIL import Image

    if not FASHION_TEST.exists():
        pytest.fail(NO_FASHION_MNIST, pytrace=False)
    raw = gzip.open(FASHION_TEST).read()
    return [Image.fromarray(a) for a in np.frombuffer(raw, np.uint8, offset=16).reshape(-1, 28, 28)[:n]]


# --- against the reference libraries -------------------------------------------------------------------------------


def transformers_attention_and_grads(model, x, target):
    """Eager attention with output_attentions=True; gradients of the target logit kept on the probabilities.

    Also the read-out rows, found from the reference model itself: the tokens of its last hidden state on which
    the logit depends (gradient not zero)."""
    out = model(pixel_values=x, output_attentions=True, output_hidden_states=True)
    attns = list(out.attentions)  # (1, heads, N, N) each, after softmax, as the layers used them
    last = out.hidden_states[-1]  # (1, N, C): the last block's output, before the final LayerNorm
    for a in attns + [last]:
        a.retain_grad()
    out.logits[0, target].backward()  # DeiT with teacher: its logits are already the mean of the two heads
    rows = last.grad[0].abs().sum(-1).nonzero().flatten().tolist()
    return out.logits[0].detach(), [a[0].detach() for a in attns], [a.grad[0] for a in attns], rows


@pytest.mark.parametrize("distilled", [False, True])
def test_relevance_equals_the_rule_on_transformers_attention(tmp_path, photo, distilled):
    from transformers import DeiTForImageClassificationWithTeacher, ViTForImageClassification

    ref = make_transformers(tmp_path / "ckpt", "small", distilled=distilled)
    cls = DeiTForImageClassificationWithTeacher if distilled else ViTForImageClassification
    model = cls.from_pretrained(ref.path, attn_implementation="eager").eval()
    clf = load_classifier(ref.path, device="cpu", dtype=torch.float32)
    x = clf.preprocess(photo)
    logits, _, _, rows = transformers_attention_and_grads(model, x, 0)
    model.zero_grad()
    # The rows of the tokens the reference's head reads, equally weighted (the distilled DeiT's two heads are
    # averaged): the class token, and the distillation token for distilled DeiT.
    assert rows == ([0, 1] if distilled else [0])
    top2 = logits.topk(2).indices.tolist()
    for target in top2:
        _, attns, grads, _ = transformers_attention_and_grads(model, x, target)
        num_prefix = attns[0].shape[-1] - 16  # the tokens before the 4x4 patches
        expected = chefer_float64(attns, grads, rows, num_prefix).view(4, 4)
        ours = clf.heatmap(photo, "relevance", target=target)
        assert ours.shape == (4, 4) and ours.dtype == torch.float32
        diff = assert_close(ours, expected, 1e-5, f"relevance for class {target}, distilled={distilled}")
        # The maps are small (random weights give small gradients), so the agreement is checked relative to them too.
        spread = (expected.max() - expected.min()).item()
        print(f"class {target}: max abs diff {diff:.2e}, map range {spread:.2e}")
        assert diff <= 1e-4 * spread, f"max abs difference {diff:.3g} is more than 1e-4 of the map's range {spread:.3g}"
    default = clf.heatmap(photo, "relevance")  # the top class by default
    assert torch.equal(default, clf.heatmap(photo, "relevance", target=top2[0]))


def test_relevance_of_an_average_pooled_model_reads_the_patch_rows(tmp_path, photo):
    ref = make_timm(tmp_path / "ckpt", "vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, global_pool="avg", num_classes=10)
    model = ref.model
    kept = []

    def keep(module, inputs, out):
        out.retain_grad()
        kept.append(out)

    for blk in model.blocks:
        blk.attn.fused_attn = False  # timm's explicit path, whose dropout module sees the probabilities
        blk.attn.attn_drop.register_forward_hook(keep)
    clf = load_classifier(ref.path, device="cpu", dtype=torch.float32)
    assert clf.config.global_pool == "avg"
    x = clf.preprocess(photo)
    tokens = model.forward_features(x)  # (1, 17, C): the tokens the head pools
    tokens.retain_grad()
    logits = model.forward_head(tokens)
    target = int(logits[0].argmin())  # any class will do: the least likely one
    logits[0, target].backward()
    attns, grads = [a[0].detach() for a in kept], [a.grad[0] for a in kept]
    rows = tokens.grad[0].abs().sum(-1).nonzero().flatten().tolist()  # the tokens timm's head reads
    assert rows == list(range(1, 17)), rows
    expected = chefer_float64(attns, grads, rows, 1).view(4, 4)  # the mean of those rows
    diff = assert_close(clf.heatmap(photo, "relevance", target=target), expected, 1e-5, "relevance, average pooling")
    assert diff <= 1e-4 * (expected.max() - expected.min()).item()


# --- by hand -------------------------------------------------------------------------------------------------------

# One head over 1 class token + 1x2 patches (N = 3): attention rows sum to 1; gradients with negative entries.
A1 = T([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3], [0.2, 0.2, 0.6]])
A2 = T([[0.2, 0.4, 0.4], [0.3, 0.3, 0.4], [0.5, 0.25, 0.25]])
G1 = T([[1, 2, -1], [0, 1, 1], [2, -1, 1]])
G2 = T([[-1, 1, 2], [1, 0, -2], [1, 1, 1]])


def test_relevance_by_hand():
    # G1 * A1 = [[.5, .6, -.2], [0, .6, .3], [.4, -.2, .6]], clamped: W1 = [[.5, .6, 0], [0, .6, .3], [.4, 0, .6]].
    W1 = T([[0.5, 0.6, 0], [0, 0.6, 0.3], [0.4, 0, 0.6]])
    # One layer: R = I + W1 @ I, row 0 over the patches = [.6, 0].
    assert_close(ex.relevance([A1[None]], [G1[None]]), T([0.6, 0.0]), 1e-7, "one layer")
    # G2 * A2 = [[-.2, .4, .8], [.3, 0, -.8], [.5, .25, .25]], clamped: W2.
    W2 = T([[0, 0.4, 0.8], [0.3, 0, 0], [0.5, 0.25, 0.25]])
    # Two layers: R = (I + W2)(I + W1). Row 0 of (I + W2) = [1, .4, .8];
    # times (I + W1) = [[1.5, .6, 0], [0, 1.6, .3], [.4, 0, 1.6]]: [1.5 + .32, .6 + .64, .12 + 1.28] = [1.82, 1.24, 1.4].
    assert_close(ex.relevance([A1[None], A2[None]], [G1[None], G2[None]]), T([1.24, 1.4]), 1e-6, "two layers")
    # Heads: clamp, then the mean. Head 1 has the opposite gradient, so it adds nothing but halves the mean.
    two_heads = ex.relevance([torch.stack([A1, A1])], [torch.stack([G1, -G1])])
    assert_close(two_heads, T([0.3, 0.1]), 1e-7, "clamp before the mean over heads")  # (.6 + 0)/2, (0 + .2)/2
    # Read-out rows: the mean of rows 0 and 1 of I + W1: ([1.5, .6, 0] + [0, 1.6, .3]) / 2, patches = token 2 only.
    assert_close(ex.relevance([A1[None]], [G1[None]], num_prefix=2, rows=[0, 1]), T([0.15]), 1e-7, "rows 0 and 1")
    with pytest.raises(AssertionError, match="gradient"):
        ex.relevance([A1[None], A2[None]], [G1[None]])


def test_gradient_rollout_by_hand():
    # Layer 1: mean over heads of G1 * A1, negatives to 0: W1 (as above). + I = [[1.5, .6, 0], [0, 1.6, .3], [.4, 0, 1.6]],
    # row sums 2.1, 1.9, 2.0: M1 = that / row sums. Row 0 over the patches: [.6 / 2.1, 0].
    assert_close(ex.gradient_rollout([A1[None]], [G1[None]], discard_ratio=0), T([0.6 / 2.1, 0.0]), 1e-7, "one layer")
    # vit-explain divided by a.sum(dim=-1) broadcast along the rows: column j by row j's sum, so row 0's patches
    # became [.6 / 1.9, 0 / 2.0] (#16). Renormalised rows sum to 1.
    assert not torch.allclose(ex.gradient_rollout([A1[None]], [G1[None]], discard_ratio=0), T([0.6 / 1.9, 0.0]))
    M1 = T([[1.5 / 2.1, 0.6 / 2.1, 0], [0, 1.6 / 1.9, 0.3 / 1.9], [0.2, 0, 0.8]])
    # Layer 2: W2 = [[0, .4, .8], [.3, 0, 0], [.5, .25, .25]]; + I, row sums 2.2, 1.3, 2.0.
    M2 = T([[1 / 2.2, 0.4 / 2.2, 0.8 / 2.2], [0.3 / 1.3, 1 / 1.3, 0], [0.25, 0.125, 0.625]])
    expected = (M2 @ M1)[0, 1:]
    # Row 0 of M2 @ M1 by hand: [1.5/2.1/2.2 + .8*.2/2.2, (.6/2.1 + .4*1.6/1.9)/2.2, (.4*.3/1.9 + .8*.8)/2.2].
    assert_close(expected, T([(0.6 / 2.1 + 0.4 * 1.6 / 1.9) / 2.2, (0.4 * 0.3 / 1.9 + 0.64) / 2.2]), 1e-6, "the product")
    ours = ex.gradient_rollout([A1[None], A2[None]], [G1[None], G2[None]], discard_ratio=0)
    assert_close(ours, expected, 1e-6, "two layers")
    # Each gradient goes with its own layer: vit-explain's backward hooks gave them last layer first (#6).
    swapped = ex.gradient_rollout([A1[None], A2[None]], [G2[None], G1[None]], discard_ratio=0)
    assert (swapped - expected).abs().max() > 0.05
    # Heads: the mean of G * A first, then negatives to 0 (vit-explain's order): heads G1 and -G1 cancel to 0,
    # leaving rollout of the identity: nothing flows to the patches.
    assert_close(ex.gradient_rollout([torch.stack([A1, A1])], [torch.stack([G1, -G1])], discard_ratio=0), T([0.0, 0.0]), 0, "mean, then clamp")


def test_gradient_rollout_discards_like_rollout():
    # With gradients of 1 everywhere it is plain rollout (mean fusion), discarding included.
    ones = [torch.ones(2, 3, 3), torch.ones(2, 3, 3)]
    attns = [torch.stack([A1, A2]), torch.stack([A2, A1])]
    for ratio in (0.0, 0.3, 0.6):
        assert_close(ex.gradient_rollout(attns, ones, discard_ratio=ratio), ex.rollout(attns, discard_ratio=ratio), 1e-7, f"discard {ratio}")


def test_class_specific_methods_need_gradients():
    with pytest.raises(ValueError, match="gradients"):
        ex.patch_map("relevance", ex.Evidence([A1[None]]))


# --- through the Classifier, on the bundled model --------------------------------------------------------------------


@pytest.fixture(scope="module")
def bundled():
    return load_classifier(BUNDLED, device="cpu", dtype=torch.float32)


def test_maps_depend_on_the_class_only_for_the_class_specific_methods(bundled):
    image = fashion_images(1)[0]
    (first, p1), (second, p2) = bundled.predict(image, k=2)
    assert first != second
    for method in ex.METHODS:
        a, b = bundled.heatmap(image, method, target=first), bundled.heatmap(image, method, target=second)
        if method in ex.CLASS_SPECIFIC:
            rho = spearmanr(a.flatten(), b.flatten()).statistic
            assert (a - b).abs().max() > 1e-3 * a.abs().max() and rho < 0.95, (method, rho)
        else:
            assert torch.equal(a, b), method
    # Labels and indices name the same class.
    idx = bundled.labels.index(second)
    assert torch.equal(bundled.heatmap(image, "relevance", target=second), bundled.heatmap(image, "relevance", target=idx))


def test_maps_change_when_the_weights_are_randomised(bundled):
    """Model randomisation (Adebayo et al. 2018): a map that stays the same explains the image, not the model."""
    randomised = load_classifier(BUNDLED, device="cpu", dtype=torch.float32)
    torch.manual_seed(0)
    randomised.model.load_state_dict(VisionTransformer(randomised.config).state_dict())  # a freshly initialised ViT
    images = fashion_images(20)
    for method in ex.CLASS_SPECIFIC:
        rhos = []
        for image in images:
            target = bundled.predict(image, k=1)[0][0]  # the trained model's class, asked of both
            a = bundled.heatmap(image, method, target=target).flatten()
            b = randomised.heatmap(image, method, target=target).flatten()
            rhos.append(spearmanr(a, b).statistic)
        assert np.mean(rhos) < 0.5, (method, np.mean(rhos), rhos)


def test_heatmap_shapes_targets_and_errors(bundled):
    image = fashion_images(1)[0]
    for method in ex.METHODS:
        m = bundled.heatmap(image, method)
        assert m.shape == ((4, 7, 7) if method == "heads" else (7, 7)) and torch.isfinite(m).all(), method
        assert m.max() > 0 and m.std() > 0, f"{method}: an empty or flat map (vit-explain's under fused attention, #23)"
    with pytest.raises(ValueError, match="is not one of this model's 10 classes") as e:
        bundled.heatmap(image, "relevance", target="tabby cat")
    assert "labels" in str(e.value)
    with pytest.raises(ValueError, match="out of range"):
        bundled.heatmap(image, "relevance", target=10)
    with pytest.raises(ValueError, match="out of range"):
        bundled.heatmap(image, "attention", layer=6)
    with pytest.raises(ValueError, match="out of range"):
        bundled.heatmap(image, "attention", head=4)
    with pytest.raises(ValueError, match="method"):
        bundled.heatmap(image, "gradcam")
    with pytest.raises(TypeError, match="option"):
        bundled.heatmap(image, "rollout", discard=0.5)
    assert bundled.target_index("sneaker") == bundled.labels.index("Sneaker")  # any case
    assert bundled.target_index("7") == 7


def test_gradients_leave_nothing_behind_and_work_under_inference_mode(bundled):
    image = fashion_images(1)[0]
    expected = bundled.heatmap(image, "relevance")
    assert all(p.grad is None for p in bundled.model.parameters()), "no weight gradients are kept"
    with torch.inference_mode():
        assert torch.equal(bundled.heatmap(image, "relevance"), expected)
    with torch.no_grad():
        assert torch.equal(bundled.heatmap(image, "relevance"), expected)


def test_gradients_are_kept_per_key_and_class(bundled, monkeypatch):
    from vit_demo import attribution

    image = fashion_images(2)[1]
    calls = []
    passes = attribution.trace
    monkeypatch.setattr(attribution, "trace", lambda *a, **k: (calls.append(1) if a[3:] or k.get("gradients") else None) or passes(*a, **k))
    crop, attns, logits = bundled.attention(image, key="photo-1")
    top = int(logits.argmax())
    a = bundled.heatmap(image, "relevance", key="photo-1")
    b = bundled.heatmap(image, "gradient_rollout", target=top, key="photo-1", discard_ratio=0.5)
    assert len(calls) == 1, "one forward and backward pass for both class-specific maps of the top class"
    bundled.heatmap(image, "relevance", target=(top + 1) % 10, key="photo-1")
    assert len(calls) == 2
    assert torch.equal(a, bundled.heatmap(image, "relevance", target=top))  # without a key: computed afresh, the same
    assert len(calls) == 3
    assert bundled.attention(image, key="photo-1")[1] is attns, "the attention memo is kept"
    assert b.shape == (7, 7)
    # The balanced methods share one balanced pass of their own.
    bundled.heatmap(image, "libra_fullgrad", key="photo-1")
    bundled.heatmap(image, "input_x_gradient", key="photo-1")
    bundled.heatmap(image, "balanced_relevance", key="photo-1")
    assert len(calls) == 4


def test_bfloat16_model_gives_float32_gradients(bundled):
    half = load_classifier(BUNDLED, device="cpu", dtype=torch.bfloat16)
    image = fashion_images(1)[0]
    logits, attns, grads, targets = half.attention_gradients(half.preprocess(image))
    assert attns[0].dtype == grads[0].dtype == torch.float32 and grads[0].abs().sum() > 0
    rho = spearmanr(half.heatmap(image, "relevance").flatten(), bundled.heatmap(image, "relevance").flatten()).statistic
    assert rho > 0.9, rho


def test_a_batch_gives_each_image_its_own_gradients(bundled):
    images = fashion_images(3)
    x = torch.cat([bundled.preprocess(im) for im in images])
    _, attns, grads, targets = bundled.attention_gradients(x, [9, 0, 3])
    assert targets.tolist() == [9, 0, 3]
    for i, im in enumerate(images):
        _, a1, g1, _ = bundled.attention_gradients(bundled.preprocess(im), [targets[i].item()])
        assert_close(grads[-1][i], g1[-1][0], 1e-6, f"image {i} alone vs in the batch")


def test_every_map_of_an_average_pooled_model_reads_the_pooled_rows(tmp_path, photo):
    """Attention and rollout, like relevance, read the rows of the tokens the head reads: for average pooling the
    patch tokens, found here from timm's own model, not the class token (whose last state the logits ignore)."""
    ref = make_timm(tmp_path / "ckpt", "vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, global_pool="avg", num_classes=10)
    model = ref.model
    kept = []
    for blk in model.blocks:
        blk.attn.fused_attn = False
        blk.attn.attn_drop.register_forward_hook(lambda m, i, out: kept.append(out.detach()[0]))
    clf = load_classifier(ref.path, device="cpu", dtype=torch.float32)
    x = clf.preprocess(photo).requires_grad_(False)
    tokens = model.forward_features(x)
    tokens.retain_grad()
    model.forward_head(tokens).sum().backward()
    rows = tokens.grad[0].abs().sum(-1).nonzero().flatten().tolist()  # the tokens timm's head reads
    assert clf.model.readout_tokens(17) == rows == list(range(1, 17))
    last = kept[-1].mean(0).double()  # (17, 17): the last layer, mean of heads
    expected = last[rows].mean(0)[1:].view(4, 4)
    assert_close(clf.heatmap(photo, "attention"), expected, 1e-6, "attention, average pooling")
    R = torch.eye(17, dtype=torch.float64)
    for a in kept:
        a = a.mean(0).double() + torch.eye(17, dtype=torch.float64)
        R = (a / a.sum(-1, keepdim=True)) @ R
    assert_close(clf.heatmap(photo, "rollout", discard_ratio=0.0), R[rows].mean(0)[1:].view(4, 4), 1e-6, "rollout, average pooling")
    assert (R[0, 1:] - R[rows].mean(0)[1:]).abs().max() > 1e-3, "the class token's row would differ"

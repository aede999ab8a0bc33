"""Deletion and insertion (vit_demo.faithfulness, Classifier.faithfulness) on a toy model with a known answer, against
scipy and hand computations, and through the Classifier on the bundled model and a ViT-B/16-sized grid."""

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from conftest import NO_FASHION_MNIST, assert_close, make_transformers
from vit_demo import load_classifier
from vit_demo import faithfulness as faith

BUNDLED = Path(__file__).resolve().parent.parent / "vit_demo" / "weights" / "vit-fashion-mnist"
FASHION_TEST = Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")


def sigmoid(v: float) -> float:
    return 1 / (1 + np.exp(-v))


# --- a toy model with a known answer ---------------------------------------------------------------------------------

P, GRID, LIT = 4, (4, 4), 6  # 16x16 inputs of 4x4 patches; the model reads patch 6 = grid cell (1, 2) only


def toy_predict(x: torch.Tensor) -> torch.Tensor:
    """Two classes; class 1's logit is 10 * (mean of patch 6) - 5, class 0's is 0."""
    patch = x[:, :, 4:8, 8:12].mean(dim=(1, 2, 3))  # (B,)
    return torch.stack([torch.zeros_like(patch), 10 * patch - 5], dim=1)


def toy_input() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = 0.3 * torch.randn(1, 1, 16, 16, generator=g)  # noise the model never reads
    x[:, :, 4:8, 8:12] = 1.0
    return x


def test_the_ideal_map_deletes_the_read_patch_first():
    x = toy_input()
    ideal = torch.zeros(16)
    ideal[LIT] = 1
    order = faith.ranking(ideal.view(GRID))
    assert order[0] == LIT
    worst = torch.cat([order[1:], order[:1]])  # the read patch last
    out, ends, passes = faith.deletion_insertion(toy_predict, x, {"ideal": order, "worst": worst}, 1, GRID, P)
    assert passes == 3 + 2 * 2 * 15  # three shared inputs, then 15 inner points per curve: one patch per step
    full, deleted = sigmoid(5), sigmoid(-5)
    blur_mean = faith.blurred(x, P)[0, 0, 4:8, 8:12].mean().item()
    assert ends["full"] == pytest.approx(full, abs=1e-6) and ends["deleted"] == pytest.approx(deleted, abs=1e-6)
    assert ends["blurred"] == pytest.approx(sigmoid(10 * blur_mean - 5), abs=1e-6)
    ideal_out = out["ideal"]
    # Deletion: full, then the read patch is gone from the first step on.
    assert np.allclose(ideal_out["curves"]["deletion"], [full] + [deleted] * 16, atol=1e-6)
    assert np.allclose(ideal_out["curves"]["insertion"], [ends["blurred"]] + [full] * 16, atol=1e-6)
    # Trapezoids over 16 steps of 1/16: (full + deleted) / 2 / 16 + 15 * deleted / 16.
    assert ideal_out["deletion_auc"] == pytest.approx((full + deleted) / 32 + 15 * deleted / 16, abs=1e-6)
    assert ideal_out["deletion_auc"] < 0.05
    assert ideal_out["insertion_auc"] == pytest.approx((ends["blurred"] + full) / 32 + 15 * full / 16, abs=1e-6)
    assert ideal_out["insertion_auc"] > 0.9
    assert out["worst"]["deletion_auc"] > 0.9 and out["worst"]["insertion_auc"] < 0.1
    assert ideal_out["curves"]["x"] == [k / 16 for k in range(17)]


def test_random_orders_score_near_the_middle():
    x = toy_input()
    orders = {seed: faith.random_order(16, seed) for seed in range(300)}
    out, _, _ = faith.deletion_insertion(toy_predict, x, orders, 1, GRID, P, batch_size=4096)
    deletion = np.mean([o["deletion_auc"] for o in out.values()])
    insertion = np.mean([o["insertion_auc"] for o in out.values()])
    # The read patch sits at a uniformly random place: the probability drops after (place + 1) / 16 of the way.
    assert deletion == pytest.approx(0.5, abs=0.05) and insertion == pytest.approx(0.5, abs=0.05), (deletion, insertion)


def test_equal_steps_and_the_default_budget():
    assert faith.patch_counts(10, 4) == [0, 2, 5, 8, 10]  # round(i * 10 / 4)
    assert faith.patch_counts(49, 49) == list(range(50))
    assert faith.default_steps(49) == 49  # the bundled 7x7 model: one patch per step
    assert faith.default_steps(16) == 16
    steps = faith.default_steps(196)  # ViT-B/16
    per_step = 2 * (1 + faith.RANDOM_ORDERS)  # both curves, of the map and of each random order
    assert 3 + per_step * (steps - 1) <= faith.FORWARD_BUDGET < 3 + per_step * steps, "the most steps within the budget"
    counts = faith.patch_counts(196, steps)
    sizes = np.diff(counts)
    assert counts[0] == 0 and counts[-1] == 196 and sizes.max() - sizes.min() <= 1, sizes
    with pytest.raises(ValueError, match="steps"):
        faith.patch_counts(16, 17)
    with pytest.raises(ValueError, match="steps"):
        faith.patch_counts(16, 0)


def test_auc_is_the_trapezoid_rule_with_both_ends():
    xs, ys = [0, 0.25, 0.5, 0.75, 1.0], [1.0, 0.5, 0.4, 0.1, 0.0]
    assert faith.auc(xs, ys) == pytest.approx(np.trapezoid(ys, xs))
    assert faith.auc([0, 1], [1, 1]) == 1.0 and faith.auc([0, 1], [0, 1]) == 0.5


def test_blur_matches_scipy():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 1, 28, 28, generator=g)
    ours = faith.blurred(x, 4)[0, 0].double().numpy()
    # sigma = one patch; torch's "reflect" padding is scipy's "mirror"; radius 3 sigma.
    ref = gaussian_filter(x[0, 0].double().numpy(), sigma=4, mode="mirror", truncate=3.0)
    assert np.abs(ours - ref).max() < 1e-5


def test_masks_cover_whole_patches_in_order_and_leave_the_remainder():
    # A 30x30 crop of 4-px patches: a 7x7 grid, the last 2 rows and columns of pixels are not seen.
    order = torch.tensor([48, 0, 10] + list(range(1, 10)) + list(range(11, 48)))
    m = faith.masks(order, [0, 1, 3, 49], (7, 7), 4, (30, 30))
    assert m.shape == (4, 1, 30, 30) and m.dtype == torch.bool
    assert not m[0].any()
    assert m[1, 0, 24:28, 24:28].all() and m[1].sum() == 16  # patch 48: the bottom-right of the grid
    assert m[2, 0, :4, :4].all() and m[2, 0, 4:8, 12:16].all() and m[2].sum() == 48  # + patches 0 and 10 = (1, 3)
    assert m[3, 0, :28, :28].all() and not m[3, 0, 28:].any() and not m[3, 0, :, 28:].any()


def test_ties_are_not_read_top_left_first():
    flat = torch.zeros(49)
    flat[30] = 1
    order = faith.ranking(flat.view(7, 7))
    assert order[0] == 30 and sorted(order.tolist()) == list(range(49))
    assert order[1:6].tolist() != [0, 1, 2, 3, 4]
    assert torch.equal(order, faith.ranking(flat.view(7, 7))), "the same order every call"
    # Ties are broken independently of the random baseline: a flat map is none of the baseline's orders.
    flat_order = faith.ranking(torch.zeros(49))
    for order in faith.random_orders(49).values():
        assert not torch.equal(flat_order, order)


def test_the_random_baseline_is_the_mean_of_several_seeded_orders():
    x = toy_input()
    orders = faith.random_orders(16)
    assert len(orders) == faith.RANDOM_ORDERS >= 3
    assert len({tuple(o.tolist()) for o in orders.values()}) == len(orders), "different orders"
    out, _, _ = faith.deletion_insertion(toy_predict, x, orders, 1, GRID, P)
    mean = faith.mean_scores(list(out.values()))
    single = [o["deletion_auc"] for o in out.values()]
    assert mean["deletion_auc"] == pytest.approx(np.mean(single)) and mean["deletion_auc_sd"] == pytest.approx(np.std(single, ddof=1))
    assert mean["deletion_auc_sd"] > 0.05, "one order alone is one draw: the orders spread"
    assert mean["curves"]["deletion"] == pytest.approx(np.mean([o["curves"]["deletion"] for o in out.values()], axis=0).tolist())


def test_random_orders_of_another_seed_are_other_orders():
    """The benchmark gives each image orders of its own: a seed gives the same orders every call, another seed
    other ones."""
    first, again, other = faith.random_orders(49, seed=3), faith.random_orders(49, seed=3), faith.random_orders(49, seed=6)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not any(torch.equal(first[k], other[j]) for k in first for j in other)
    assert all(torch.equal(faith.random_orders(49)[k], faith.random_orders(49, seed=faith.RANDOM_SEED)[k]) for k in first)


def test_saco_by_hand():
    # Wu et al. 2024, algorithm 1: pairs (i, j), i < j; weight s_i - s_j, negated where the effects disagree.
    # s = [3, 2, 1], effects [.5, .1, .3]: (0,1) agree +1, (0,2) agree +2, (1,2) disagree -1: (1 + 2 - 1) / 4.
    assert faith.saco([3, 2, 1], [0.5, 0.1, 0.3]) == pytest.approx(0.5)
    assert faith.saco([3, 2, 1], [0.5, 0.3, 0.1]) == 1.0  # effects in the map's order
    assert faith.saco([3, 2, 1], [0.1, 0.3, 0.5]) == -1.0  # in the reverse order
    # Equal effects count as agreeing (pred_i >= pred_j): the weight is added.
    assert faith.saco([4, 1, 1], [0.2, 0.2, 0.0]) == pytest.approx((3 + 3 + 0) / 6)
    with pytest.raises(ValueError, match="same"):
        faith.saco([1, 1, 1], [0.3, 0.2, 0.1])


def test_saco_of_the_ideal_map_and_its_reverse():
    # The toy model reads one patch: deleting the group that holds it is the only effect.
    x = toy_input()
    ideal = torch.zeros(16)
    ideal[LIT] = 1.0
    ideal[torch.arange(16) != LIT] = torch.linspace(0.5, 0.1, 15)  # distinct values, so the groups are ranked
    full = toy_predict(x).softmax(-1)[0, 1].item()
    value, passes = faith.saco_score(toy_predict, x, ideal, 1, GRID, P, full, groups=4)
    assert passes == 4 and value == 1.0
    value, _ = faith.saco_score(toy_predict, x, -ideal, 1, GRID, P, full, groups=4)
    assert value < 0


# --- through the Classifier ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bundled():
    return load_classifier(BUNDLED, device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def shoe():
    from PIL import Image

    if not FASHION_TEST.exists():
        pytest.fail(NO_FASHION_MNIST, pytrace=False)
    raw = gzip.open(FASHION_TEST).read()
    return Image.fromarray(np.frombuffer(raw, np.uint8, offset=16).reshape(-1, 28, 28)[0])  # an ankle boot


def test_faithfulness_on_the_bundled_model(bundled, shoe):
    seen = []
    r = bundled.faithfulness(shoe, "relevance", progress=lambda done, total: seen.append((done, total)), batch_size=64)
    (label, p), _ = bundled.predict(shoe, k=2)
    assert r["method"] == "relevance" and r["target"] == label and r["target_index"] == bundled.labels.index(label)
    passes = 3 + 2 * 48 * (1 + faith.RANDOM_ORDERS)  # the shared ends, then both curves of the map and each random order
    assert r["steps"] == 49 and r["forward_passes"] == passes + faith.SACO_GROUPS
    assert seen[-1] == (passes, passes) and [d for d, _ in seen] == sorted(d for d, _ in seen) and len(seen) == -(-passes // 64)
    assert -1 <= r["saco"] <= 1
    # The baseline is the mean of the seeded random orders, with their spread.
    assert r["random"]["orders"] == faith.RANDOM_ORDERS and r["random"]["deletion_auc_sd"] > 0
    for curves in (r["curves"], r["random"]["curves"]):
        assert len(curves["x"]) == len(curves["deletion"]) == len(curves["insertion"]) == 50
        assert curves["deletion"][0] == curves["insertion"][-1] == pytest.approx(p, abs=1e-5)
    for auc in (r["deletion_auc"], r["insertion_auc"], r["random"]["deletion_auc"], r["random"]["insertion_auc"]):
        assert 0 <= auc <= 1
    # A point of the deletion curve, recomputed by hand: the map's 5 most relevant patches set to 0.
    m = bundled.heatmap(shoe, "relevance").flatten()
    top5 = m.argsort(descending=True)[:5]
    x = bundled.preprocess(shoe).clone()
    for i in top5.tolist():
        r_, c_ = divmod(i, 7)
        x[:, :, 4 * r_ : 4 * r_ + 4, 4 * c_ : 4 * c_ + 4] = 0
    with torch.no_grad():
        by_hand = bundled.model(x).softmax(-1)[0, r["target_index"]].item()
    assert r["curves"]["deletion"][5] == pytest.approx(by_hand, abs=1e-5)

    # Another method on the same photo and class: the random baseline is kept, not recomputed.
    again = bundled.faithfulness(shoe, "rollout", target=label)
    assert again["forward_passes"] == 2 * 48 + faith.SACO_GROUPS and again["random"] == r["random"]
    assert again["curves"]["deletion"][0] == r["curves"]["deletion"][0]
    # Another class: its own baseline.
    other = bundled.faithfulness(shoe, "relevance", target=1)
    assert other["target"] == bundled.labels[1] and other["forward_passes"] == passes + faith.SACO_GROUPS
    # Fewer steps on request.
    few = bundled.faithfulness(shoe, "attention", steps=7, layer=-1)
    assert few["steps"] == 7 and len(few["curves"]["x"]) == 8
    assert few["forward_passes"] == 3 + 2 * 6 * (1 + faith.RANDOM_ORDERS) + faith.SACO_GROUPS
    with pytest.raises(ValueError, match="head"):
        bundled.faithfulness(shoe, "heads")
    with pytest.raises(ValueError, match="classes"):
        bundled.faithfulness(shoe, "relevance", target="tabby cat")


def test_a_vit_b16_grid_stays_within_the_budget(tmp_path, photo):
    # ViT-B/16's grid (224 px, 16-px patches: 196 patches) on a small model, so the test stays fast.
    ref = make_transformers(tmp_path / "ckpt", "small", image_size=224, patch_size=16)
    clf = load_classifier(ref.path, device="cpu", dtype=torch.float32)
    first = clf.faithfulness(photo, "relevance")
    assert first["steps"] == 10 and first["forward_passes"] - faith.SACO_GROUPS == 75 <= faith.FORWARD_BUDGET
    assert len(first["curves"]["x"]) == 11
    assert_close(torch.tensor(np.diff(first["curves"]["x"])), torch.full((10,), 0.1, dtype=torch.float64), 0.006, "equal steps")
    later = clf.faithfulness(photo, "gradient_rollout")
    assert later["forward_passes"] == 18 + faith.SACO_GROUPS and later["random"] == first["random"]

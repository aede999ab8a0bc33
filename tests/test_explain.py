"""The explanation math (vit_demo.explain) against values worked out by hand on small attention tensors.

Attention tensors are built here, each (heads, N, N) with N = num_prefix + gh * gw and rows summing to 1,
so every expected number below can be checked with pencil and paper.
"""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import assert_close
from vit_demo import ViTConfig, VisionTransformer
from vit_demo import explain as ex


def T(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


def rows_sum_to_one(a: torch.Tensor) -> torch.Tensor:
    assert_close(a.sum(-1), torch.ones(a.shape[:-1]), 1e-6, "attention rows sum to 1")
    return a


def uniform(heads: int, n: int) -> torch.Tensor:
    return torch.full((heads, n, n), 1.0 / n)


def random_crop(h: int, w: int, c: int = 3, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (c, h, w), generator=g, dtype=torch.uint8)


# Two hand-picked 1-head layers over 1 class token + 1x2 patches (N = 3).
A = T([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3], [0.2, 0.2, 0.6]])
B = T([[0.2, 0.4, 0.4], [0.3, 0.3, 0.4], [0.5, 0.25, 0.25]])


# --- uniform attention --------------------------------------------------------------------------------------


def test_uniform_attention_gives_uniform_maps():
    n = 1 + 2 * 2
    attns = [uniform(3, n), uniform(3, n)]
    assert_close(ex.cls_attention(attns), torch.full((4,), 0.2), 1e-7, "cls_attention")
    assert_close(ex.cls_attention(attns, head=1, layer=0), torch.full((4,), 0.2), 1e-7, "cls_attention head 1")
    assert_close(ex.all_heads(attns), torch.full((3, 4), 0.2), 1e-7, "all_heads")
    # One layer: M = (J/5 + I) / 2 = 0.1 J + 0.5 I, so row 0's patch entries are 0.1.
    assert_close(ex.rollout(attns[:1]), torch.full((4,), 0.1), 1e-7, "rollout, 1 layer")
    # Two layers: M @ M = 0.01 J^2 + 0.1 J + 0.25 I = 0.15 J + 0.25 I, so 0.15 off the diagonal.
    assert_close(ex.rollout(attns), torch.full((4,), 0.15), 1e-7, "rollout, 2 layers")
    for fusion in ex.HEAD_FUSIONS:
        w = ex.rollout(attns, head_fusion=fusion)
        assert torch.allclose(w, w[0].expand_as(w)), fusion


def test_heatmap_of_a_constant_grid_is_finite():
    for value in (0.0, 0.25, 1.0):
        heat = ex.heatmap(torch.full((2, 3), value), 32, 48)
        assert heat.shape == (32, 48)
        assert np.isfinite(heat).all(), f"NaN/inf in the heatmap of a constant grid of {value}"
        assert (heat >= 0).all() and (heat <= 1).all()
        assert heat.max() == heat.min()  # a constant grid stays constant
    # ... and drawing it does not fail either.
    img = ex.overlay(random_crop(32, 48), torch.full((2, 3), 0.2))
    assert np.isfinite(np.asarray(img, dtype=np.float32)).all()


# --- a head that looks at one patch ---------------------------------------------------------------------------


def test_a_head_looking_at_one_patch_lights_only_that_patch():
    n, target = 1 + 2 * 2, 2  # patch 2 = token 3 = grid cell (1, 0)
    attn = uniform(3, n).clone()
    attn[1, 0] = 0
    attn[1, 0, 1 + target] = 1.0
    rows_sum_to_one(attn)
    one_hot = torch.zeros(4)
    one_hot[target] = 1
    assert_close(ex.cls_attention([attn], head=1), one_hot, 0, "cls_attention of head 1")
    heads = ex.all_heads([attn])
    assert heads.shape == (3, 4)
    assert_close(heads[1], one_hot, 0, "all_heads row 1")
    assert_close(heads[0], torch.full((4,), 0.2), 1e-7, "all_heads row 0 (uniform)")
    assert_close(heads[2], torch.full((4,), 0.2), 1e-7, "all_heads row 2 (uniform)")
    # The mean over heads: (0.2 + 1 + 0.2) / 3 on the target, 0.4 / 3 elsewhere.
    expected_mean = torch.full((4,), 0.4 / 3)
    expected_mean[target] = 1.4 / 3
    assert_close(ex.cls_attention([attn]), expected_mean, 1e-6, "cls_attention, mean of heads")

    grid = ex.to_grid(ex.cls_attention([attn], head=1), (2, 2))
    assert grid.tolist() == [[0, 0], [1, 0]]
    heat = ex.heatmap(grid, 32, 32)
    # Only around the bottom-left cell is lit (bilinear upsampling blurs one half-cell across the border):
    # its outer corner is fully bright, the top row of cells and the right column of cells stay dark.
    assert (heat[24:, :8] == 1).all()
    assert heat[:8].max() == 0 and heat[:, 24:].max() == 0
    assert heat[16:, :16].mean() > heat[:16, 16:].mean()


# --- rollout --------------------------------------------------------------------------------------------------


def test_rollout_one_layer_is_row_0_of_identity_added_and_renormalised():
    rows_sum_to_one(A)
    # (A + I) / 2 = [[.75, .15, .1], [.05, .8, .15], [.1, .1, .8]]: row 0 restricted to the patches.
    assert_close(ex.rollout([A[None]]), T([0.15, 0.1]), 1e-7, "rollout of A")
    assert_close(ex.rollout([A[None]]), ((A + torch.eye(3)) / 2)[0, 1:], 1e-7, "rollout of A, as a formula")


def test_rollout_two_layers_is_the_matrix_product():
    rows_sum_to_one(B)
    # M_A = (A + I)/2, M_B = (B + I)/2 = [[.6, .2, .2], [.15, .65, .2], [.25, .125, .625]].
    # Row 0 of M_B @ M_A = .6 * [.75, .15, .1] + .2 * [.05, .8, .15] + .2 * [.1, .1, .8] = [.48, .27, .25].
    assert_close(ex.rollout([A[None], B[None]]), T([0.27, 0.25]), 1e-6, "rollout of A then B")
    # The order matters: B then A is row 0 of M_A @ M_B.
    m_a, m_b = (A + torch.eye(3)) / 2, (B + torch.eye(3)) / 2
    assert_close(ex.rollout([B[None], A[None]]), (m_a @ m_b)[0, 1:], 1e-6, "rollout of B then A")
    assert not torch.allclose(ex.rollout([B[None], A[None]]), T([0.27, 0.25]))


def test_rollout_does_not_change_its_inputs():
    attns = [torch.stack([A, B]), torch.stack([B, A])]
    before = [a.clone() for a in attns]
    ex.rollout(attns, discard_ratio=0.5)
    for a, b in zip(attns, before):
        assert torch.equal(a, b)


def test_fuse_heads_mean_max_min():
    two = torch.stack([A, B])  # heads 0 and 1
    assert_close(ex.fuse_heads(two, "mean"), T([[0.35, 0.35, 0.3], [0.2, 0.45, 0.35], [0.35, 0.225, 0.425]]), 1e-7, "mean")
    assert_close(ex.fuse_heads(two, "max"), T([[0.5, 0.4, 0.4], [0.3, 0.6, 0.4], [0.5, 0.25, 0.6]]), 0, "max")
    assert_close(ex.fuse_heads(two, "min"), T([[0.2, 0.3, 0.2], [0.1, 0.3, 0.3], [0.2, 0.2, 0.25]]), 0, "min")
    with pytest.raises(ValueError, match="head_fusion"):
        ex.fuse_heads(two, "median")


def test_rollout_head_fusions_by_hand():
    two = [torch.stack([A, B])]
    # mean row 0 = [.35, .35, .3]; + I -> [1.35, .35, .3] / 2
    assert_close(ex.rollout(two, head_fusion="mean"), T([0.175, 0.15]), 1e-7, "mean")
    # max row 0 = [.5, .4, .4] (sums to 1.3); + I -> [1.5, .4, .4] / 2.3
    assert_close(ex.rollout(two, head_fusion="max"), T([0.4 / 2.3, 0.4 / 2.3]), 1e-7, "max")
    # min row 0 = [.2, .3, .2] (sums to 0.7); + I -> [1.2, .3, .2] / 1.7
    assert_close(ex.rollout(two, head_fusion="min"), T([0.3 / 1.7, 0.2 / 1.7]), 1e-7, "min")
    with pytest.raises(ValueError):
        ex.rollout(two, head_fusion="sum")


def test_discard_ratio_zeroes_the_weakest_entries_but_keeps_the_class_token_itself():
    # Nine distinct values; ascending: .02 [0,0], .08 [0,1], .2 [1,0], .25 [2,2], .3 [1,2], .35 [2,0], ...
    C = rows_sum_to_one(T([[0.02, 0.08, 0.9], [0.2, 0.5, 0.3], [0.35, 0.4, 0.25]]))
    # No discarding: [1.02, .08, .9] / 2.
    assert_close(ex.rollout([C[None]]), T([0.04, 0.45]), 1e-7, "discard 0")
    # discard_ratio 0.25 -> int(9 * 0.25) = 2 weakest: [0,0] (kept) and [0,1] (zeroed).
    # Row 0 becomes [.02, 0, .9]; + I -> [1.02, 0, .9] / 1.92.  (Zeroing [0,0] too would give .9 / 1.9.)
    assert_close(ex.rollout([C[None]], discard_ratio=0.25), T([0.0, 0.9 / 1.92]), 1e-7, "discard 0.25")
    # discard_ratio 0.5 -> 4 weakest: [0,0] (kept), [0,1], [1,0], [2,2]; row 0 is the same as above.
    assert_close(ex.rollout([C[None]], discard_ratio=0.5), T([0.0, 0.9 / 1.92]), 1e-7, "discard 0.5")
    # Two layers, to see that zeroed entries outside row 0 matter: [1,0] and [2,2] are gone in layer 1.
    m1 = T([[1.02, 0, 0.9], [0, 1.5, 0.3], [0.35, 0.4, 1.0]])
    m1 = m1 / m1.sum(-1, keepdim=True)
    expected = (m1 @ m1)[0, 1:]
    assert_close(ex.rollout([C[None], C[None]], discard_ratio=0.5), expected, 1e-6, "discard 0.5, two layers")
    # A ratio too small to discard anything changes nothing.
    assert_close(ex.rollout([C[None]], discard_ratio=0.05), ex.rollout([C[None]]), 0, "discard 0.05 (k = 0)")


# --- the distillation token -----------------------------------------------------------------------------------


def test_the_distillation_token_is_never_drawn():
    # num_prefix = 2 (class, distillation) + 1x2 patches: N = 4.
    on_dist = rows_sum_to_one(T([[0.1, 0.6, 0.2, 0.1], [0.25] * 4, [0.25] * 4, [0.25] * 4]))
    on_cls = rows_sum_to_one(T([[0.7, 0.0, 0.2, 0.1], [0.25] * 4, [0.25] * 4, [0.25] * 4]))
    for attn in (on_dist, on_cls):
        w = ex.cls_attention([attn[None]], num_prefix=2)
        assert w.shape == (2,)
        assert_close(w, T([0.2, 0.1]), 1e-7, "cls_attention over the patches only")
        assert ex.all_heads([attn[None]], num_prefix=2).shape == (1, 2)
        # One layer of rollout: row 0 of (attn + I) / 2 on the patches, whoever holds the prefix mass.
        assert_close(ex.rollout([attn[None]], num_prefix=2), T([0.1, 0.05]), 1e-7, "rollout over the patches only")
    # The 0.6 on token 1 shows up nowhere: the maps are identical to those with it on the class token.
    assert torch.equal(ex.cls_attention([on_dist[None]], num_prefix=2), ex.cls_attention([on_cls[None]], num_prefix=2))
    # Drawn on a 16x32 crop: a 1x2 grid of patches, not 1x3.
    img = ex.render(random_crop(16, 32), [on_dist[None]], num_prefix=2, method="attention")
    assert img.size == (32, 16)
    # With num_prefix=1 the same tensor would wrongly draw token 1 as a patch (3 entries).
    assert ex.cls_attention([on_dist[None]], num_prefix=1).shape == (3,)


# --- grids, overlays, panels ----------------------------------------------------------------------------------


def test_grid_shape_and_to_grid_for_a_non_square_crop():
    assert ex.grid_shape(32, 48, 16) == (2, 3)  # 2x3 patches of 16 px on a 32x48 crop
    assert ex.grid_shape(48, 32, 16) == (3, 2)
    assert ex.grid_shape(224, 224, 32) == (7, 7)
    assert ex.grid_shape(224, 160, 16) == (14, 10)
    assert ex.grid_shape(230, 100, 16) == (14, 6)  # pixels past the last whole patch are not seen
    assert ex.infer_grid(6, 32, 48) == (2, 3) and ex.infer_grid(6, 48, 32) == (3, 2)
    grid = ex.to_grid(torch.arange(6.0), (2, 3))
    assert grid.tolist() == [[0, 1, 2], [3, 4, 5]]  # row-major
    assert ex.to_grid(torch.arange(12.0).view(2, 6), (2, 3)).shape == (2, 2, 3)  # leading dimensions kept
    with pytest.raises(AssertionError):
        ex.to_grid(torch.arange(7.0), (2, 3))


def test_the_grid_is_the_models_own_not_a_guess_from_the_aspect_ratio():
    # A 32x31 crop with 16-px patches holds 2 rows of 1 patch: (2, 1). A guess from the aspect ratio gave (1, 2).
    one_patch_lit = rows_sum_to_one(T([[0, 1, 0], [1 / 3] * 3, [1 / 3] * 3]))[None]  # the class token reads patch 0
    lit = np.asarray(ex.render(random_crop(32, 31), [one_patch_lit], method="attention", alpha=1.0))
    assert lit.shape == (32, 31, 3)
    top, bottom = lit[:8].astype(int).sum(-1), lit[24:].astype(int).sum(-1)
    assert (top > bottom).all(), "patch 0 is the top row, drawn across the whole width"
    # 224x207 with 16-px patches is a 14x12 grid; the guess found no grid of 168 patches for it and failed.
    n = 14 * 12
    attn = torch.full((1, 1 + n, 1 + n), 1.0 / (1 + n))
    assert ex.render(random_crop(224, 207), [attn], method="attention").size == (207, 224)
    # Every size from 200 to 800 px, 16-px patches: the grid is (H // 16, W // 16), also when only the patch
    # count and the crop are known (an enlarged crop included).
    for h in range(200, 801, 7):
        for w in range(200, 801, 3):
            expected = (h // 16, w // 16)
            assert ex.grid_shape(h, w, 16) == expected
            assert ex.infer_grid(expected[0] * expected[1], h, w) == expected, (h, w)
            assert ex.infer_grid(expected[0] * expected[1], 3 * h, 3 * w) == expected, (h, w, "enlarged 3x")
    assert ex.to_grid(torch.arange(6.0), (3, 2)).tolist() == [[0, 1], [2, 3], [4, 5]]
    with pytest.raises(ValueError, match="patches"):
        ex.infer_grid(7, 32, 48)  # no patch size cuts a 32x48 crop into 7 patches


def test_heatmap_is_min_max_normalised_and_upsampled():
    heat = ex.heatmap(T([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]), 32, 48)
    assert heat.shape == (32, 48)
    assert heat.min() == pytest.approx(0.0) and heat.max() == pytest.approx(1.0)
    assert heat[0, 0] == pytest.approx(0.0) and heat[31, 47] == pytest.approx(1.0)
    # Bilinear, align_corners=False: a patch's centre has that patch's normalised value (cell (0, 1) -> 0.2).
    assert heat[7:9, 23:25].mean() == pytest.approx(0.2, abs=0.02)


def test_colorize_ends_of_the_colormap():
    rgb = ex.colorize(np.array([[0.0, 1.0, -1.0, 2.0]]))
    assert rgb.dtype == np.uint8 and rgb.shape == (1, 4, 3)
    assert rgb[0, 0].tolist() == [0, 0, 4] and rgb[0, 1].tolist() == [252, 255, 164]
    assert rgb[0, 2].tolist() == [0, 0, 4] and rgb[0, 3].tolist() == [252, 255, 164]  # clipped


def test_overlay_is_the_crop_size_and_alpha_0_is_the_crop():
    crop = random_crop(32, 48)
    grid = T([[0.1, 0.5, 0.2], [0.0, 0.9, 0.3]])
    img = ex.overlay(crop, grid)
    assert isinstance(img, Image.Image) and img.mode == "RGB"
    assert img.size == (48, 32)  # PIL: (width, height)
    assert np.array_equal(np.asarray(ex.overlay(crop, grid, alpha=0.0)), crop.permute(1, 2, 0).numpy())
    heat_only = np.asarray(ex.overlay(crop, grid, alpha=1.0))
    assert np.array_equal(heat_only, ex.colorize(ex.heatmap(grid, 32, 48)))
    # Grayscale crops (Fashion-MNIST-like, C = 1) are drawn as RGB too.
    gray = random_crop(28, 28, c=1)
    g_img = ex.overlay(gray, torch.rand(2, 2), alpha=0.0)
    assert g_img.size == (28, 28) and g_img.mode == "RGB"
    assert np.array_equal(np.asarray(g_img), gray[0].numpy()[..., None].repeat(3, -1))


def test_render_methods_and_head_panels():
    crop = random_crop(32, 48)
    heads, n = 4, 1 + 6
    g = torch.Generator().manual_seed(1)
    attns = [torch.rand(heads, n, n, generator=g).softmax(-1) for _ in range(2)]
    for method in ("rollout", "attention"):
        assert ex.render(crop, attns, method=method).size == (48, 32), method
    sheet = ex.render(crop, attns, method="heads", layer=0)
    # 4 heads -> a 2x2 sheet of 48x32 panels with 4-pixel white gaps.
    columns = math.ceil(math.sqrt(heads))
    rows = math.ceil(heads / columns)
    assert sheet.size == (columns * 48 + (columns - 1) * 4, rows * 32 + (rows - 1) * 4) == (100, 68)
    px = np.asarray(sheet)
    rows_of_heads = attns[0][:, 0, 1:]  # (heads, patches): every panel on one colour scale, the page's
    scale = (float(rows_of_heads.min()), float(rows_of_heads.max()))
    for h in range(heads):
        x0, y0 = (h % columns) * 52, (h // columns) * 36
        panel = ex.overlay(crop, ex.to_grid(rows_of_heads[h], (2, 3)), scale=scale)
        assert np.array_equal(px[y0 : y0 + 32, x0 : x0 + 48], np.asarray(panel)), f"panel {h}"
    assert (px[32:36] == 255).all() and (px[:, 48:52] == 255).all()  # the gaps
    # 3 heads: still 2 columns, 2 rows, one panel left white.
    three = ex.render(crop, [a[:3] for a in attns], method="heads")
    assert three.size == (100, 68)
    assert (np.asarray(three)[36:, 52:] == 255).all()
    with pytest.raises(ValueError, match="method"):
        ex.render(crop, attns, method="gradcam")


def test_render_passes_layer_and_head_through():
    crop = random_crop(32, 32)
    n = 1 + 4
    first, last = uniform(2, n).clone(), uniform(2, n).clone()
    first[1, 0] = T([0, 0, 0, 0, 1])  # layer 0, head 1: only patch 3 (bottom-right)
    attns = [first, last]
    lit = np.asarray(ex.render(crop, attns, method="attention", layer=0, head=1, alpha=1.0))
    assert np.array_equal(lit, ex.colorize(ex.heatmap(T([[0, 0], [0, 1]]), 32, 32)))
    flat = np.asarray(ex.render(crop, attns, method="attention", layer=-1, head=1, alpha=1.0))
    assert (flat == flat[0, 0]).all()  # the last layer is uniform: one colour


# --- through the real model -----------------------------------------------------------------------------------


@pytest.mark.parametrize("distilled", [False, True])
def test_render_from_the_real_model(distilled):
    torch.manual_seed(0)
    cfg = ViTConfig(img_size=32, patch_size=8, num_classes=10, embed_dim=64, depth=2, num_heads=4, mlp_dim=128, distilled=distilled)
    model = VisionTransformer(cfg).eval()
    p = cfg.num_prefix_tokens
    for h, w in ((32, 32), (32, 48)):  # the second is non-square: a 4x6 grid
        x = torch.randn(1, 3, h, w)
        with torch.no_grad():
            logits, attns = model(x, return_attn=True)
        assert logits.shape == (1, 10)
        attns = [a[0] for a in attns]
        n_patches = (h // 8) * (w // 8)
        assert len(attns) == 2 and attns[0].shape == (4, p + n_patches, p + n_patches)
        rows_sum_to_one(attns[0])
        r = ex.rollout(attns, p, discard_ratio=0.9)
        assert r.shape == (n_patches,) and torch.isfinite(r).all() and (r >= 0).all()
        assert ex.cls_attention(attns, p).shape == (n_patches,)
        crop = random_crop(h, w)
        for method in ("rollout", "attention"):
            img = ex.render(crop, attns, p, method)
            assert isinstance(img, Image.Image) and img.size == (w, h), (method, h, w)
        sheet = ex.render(crop, attns, p, "heads")
        assert sheet.size == (2 * w + 4, 2 * h + 4)

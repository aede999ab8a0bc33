"""The "Inside" quantities (vit_demo.inside) against numpy computations and values worked out by hand.

Mean attention distance, filter PCA and position-embedding similarity are each checked against a
plain numpy computation (loops, eigh) on small tensors, on cases whose answer is known in advance (a head
that looks only at itself, uniform attention, a sin-cos position table, filters made of two patterns), and
once on the attention of a real, small VisionTransformer.
"""

import math

import numpy as np
import pytest
import torch

from conftest import assert_close, randomize_
from vit_demo import ViTConfig, VisionTransformer
from vit_demo import inside as ins
from vit_demo.explain import colorize


def random_attention(layers: int, heads: int, n: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [(3 * torch.randn(heads, n, n, generator=g)).softmax(-1) for _ in range(layers)]


def np_centres(gh: int, gw: int, p: int) -> np.ndarray:
    """Patch centres (y, x) in pixels, row-major: patch (r, c) covers rows r*p .. r*p+p-1."""
    return np.array([((r + 0.5) * p, (c + 0.5) * p) for r in range(gh) for c in range(gw)])


def np_mean_attention_distance(attns, num_prefix, grid, p) -> np.ndarray:
    """The definition, written out as loops: (layers, heads). Each patch query's weights are renormalised over the
    patch keys."""
    centres = np_centres(*grid, p)
    n = len(centres)
    out = np.zeros((len(attns), attns[0].shape[0]))
    for layer, a in enumerate(attns):
        a = a.double().numpy()
        for h in range(a.shape[0]):
            total = 0.0
            for i in range(n):
                weights = a[h, num_prefix + i, num_prefix:]
                total += sum(w * math.dist(centres[i], centres[j]) for j, w in enumerate(weights)) / weights.sum()
            out[layer, h] = total / n
    return out


def np_prefix_share(attns, num_prefix) -> np.ndarray:
    """The attention patch queries give the prefix keys, averaged over the queries: (layers, heads)."""
    return np.stack([a.double().numpy()[:, num_prefix:, :num_prefix].sum(-1).mean(-1) for a in attns])


def mean_pairwise_distance(gh: int, gw: int, p: int) -> float:
    c = np_centres(gh, gw, p)
    return float(np.mean([[math.dist(a, b) for b in c] for a in c]))


# --- mean attention distance ------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_prefix, grid, p", [(1, (3, 3), 4), (2, (2, 3), 16), (1, (4, 2), 1)])
def test_mean_attention_distance_matches_numpy(num_prefix, grid, p):
    n = num_prefix + grid[0] * grid[1]
    attns = random_attention(3, 4, n, seed=num_prefix)
    got = ins.mean_attention_distance(attns, num_prefix, grid, p)
    assert got.shape == (3, 4)
    assert_close(got, torch.from_numpy(np_mean_attention_distance(attns, num_prefix, grid, p)).float(), 1e-4, "distance")
    share = ins.prefix_share(attns, num_prefix, grid)
    assert_close(share, torch.from_numpy(np_prefix_share(attns, num_prefix)).float(), 1e-6, "prefix share")


def test_a_head_that_sinks_into_the_class_token_is_not_called_local():
    """90% on the class token and the rest spread evenly over the patches: the distance is that of even
    attention over the patches (far more than a 4-neighbour head's p pixels), and the 90% is its prefix share."""
    gh, gw, p = 5, 5, 4
    n, N = gh * gw, 1 + gh * gw
    sink = torch.zeros(N, N)
    sink[:, 0] = 0.9
    sink[:, 1:] = 0.1 / n
    neighbours = torch.zeros(N, N)
    neighbours[0, 0] = 1
    for i in range(n):
        r, c = divmod(i, gw)
        around = [(r + dr, c + dc) for dr, dc in ((-1, 0), (1, 0), (0, -1), (0, 1)) if 0 <= r + dr < gh and 0 <= c + dc < gw]
        for rr, cc in around:
            neighbours[1 + i, 1 + rr * gw + cc] = 1 / len(around)
    attns = [torch.stack([sink, neighbours])]  # one layer, two heads
    got = ins.mean_attention_distance(attns, 1, (gh, gw), p)
    assert_close(got, torch.tensor([[mean_pairwise_distance(gh, gw, p), float(p)]]), 1e-4, "sink and neighbours")
    assert got[0, 0] > 2 * got[0, 1], "the sink head plots as more local than the neighbour head"
    assert_close(ins.prefix_share(attns, 1, (gh, gw)), torch.tensor([[0.9, 0.0]]), 1e-6, "prefix share")


def test_a_head_attending_only_to_itself_has_distance_zero():
    n = 1 + 3 * 3
    attns = [torch.eye(n).expand(2, n, n).clone() for _ in range(2)]
    assert_close(ins.mean_attention_distance(attns, 1, (3, 3), 16), torch.zeros(2, 2), 0, "own token")
    # One head of the layer looks at itself, the other at the patch to its right (or left, at the edge): p pixels.
    a = torch.zeros(2, n, n)
    a[0] = torch.eye(n)
    a[1, 0, 0] = 1
    for i in range(9):
        r, c = divmod(i, 3)
        a[1, 1 + i, 1 + r * 3 + (c + 1 if c < 2 else c - 1)] = 1
    assert_close(ins.mean_attention_distance([a], 1, (3, 3), 16), torch.tensor([[0.0, 16.0]]), 1e-5, "neighbour")


def test_uniform_attention_gives_the_mean_pairwise_distance():
    # A 1x2 grid of 4-pixel patches: the centres are 4 px apart, so the mean over the 4 (i, j) pairs is 2.
    assert mean_pairwise_distance(1, 2, 4) == pytest.approx(2.0)
    # A 2x2 grid of 1-pixel patches: from each patch, 0, 1, 1 and sqrt(2).
    assert mean_pairwise_distance(2, 2, 1) == pytest.approx((2 + math.sqrt(2)) / 4)
    for grid, p, expected in [((1, 2), 4, 2.0), ((2, 2), 1, (2 + math.sqrt(2)) / 4), ((3, 5), 8, mean_pairwise_distance(3, 5, 8))]:
        n_patches = grid[0] * grid[1]
        for num_prefix in (1, 2):
            N = num_prefix + n_patches
            # Uniform over all N tokens: the prefix tokens take num_prefix / N of the weight, which the distance
            # leaves out (renormalised over the patches) and the prefix share reports.
            uniform = [torch.full((3, N, N), 1 / N)]
            got = ins.mean_attention_distance(uniform, num_prefix, grid, p)
            assert_close(got, torch.full((1, 3), expected), 1e-5, f"uniform over all, {grid}")
            share = ins.prefix_share(uniform, num_prefix, grid)
            assert_close(share, torch.full((1, 3), num_prefix / N), 1e-6, f"prefix share, {grid}")
            # Uniform over the patches only: exactly the mean pairwise distance.
            patches_only = torch.zeros(3, N, N)
            patches_only[:, :, num_prefix:] = 1 / n_patches
            got = ins.mean_attention_distance([patches_only], num_prefix, grid, p)
            assert_close(got, torch.full((1, 3), expected), 1e-5, f"uniform over patches, {grid}")


def test_mean_attention_distance_of_a_batch_is_per_image():
    attns = random_attention(2, 3, 1 + 6, seed=5)
    batched = [torch.stack([a, a.flip(-1).softmax(-1)]) for a in attns]  # (2, heads, N, N)
    got = ins.mean_attention_distance(batched, 1, (2, 3), 4)
    assert got.shape == (2, 2, 3)
    for b in range(2):
        assert_close(got[b], ins.mean_attention_distance([a[b] for a in batched], 1, (2, 3), 4), 1e-6, f"image {b}")


def test_attention_that_does_not_fit_the_grid_is_refused():
    with pytest.raises(ValueError, match="does not fit"):
        ins.mean_attention_distance(random_attention(1, 2, 10), 1, (2, 2), 4)
    with pytest.raises(ValueError, match="does not fit"):
        ins.prefix_share(random_attention(1, 2, 10), 1, (2, 2))


@pytest.mark.parametrize("distilled, size", [(False, (16, 16)), (True, (16, 24))])
def test_mean_attention_distance_of_a_real_vit(distilled, size):
    cfg = ViTConfig(img_size=16, patch_size=4, in_chans=3, num_classes=5, embed_dim=32, depth=3, num_heads=4,
                    mlp_dim=64, distilled=distilled)
    model = randomize_(VisionTransformer(cfg), seed=1).eval()
    x = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        _, attns = model(x, return_attn=True)
    attns = [a[0] for a in attns]  # (heads, N, N)
    grid = (size[0] // 4, size[1] // 4)
    got = ins.mean_attention_distance(attns, cfg.num_prefix_tokens, grid, cfg.patch_size)
    assert got.shape == (3, 4)
    expected = np_mean_attention_distance(attns, cfg.num_prefix_tokens, grid, cfg.patch_size)
    assert_close(got, torch.from_numpy(expected).float(), 1e-4, "real ViT")
    # Renormalised weights average distances between patch centres, so no head looks further than the diagonal.
    assert (got >= 0).all() and (got <= math.dist((0, 0), (size[0] - 4, size[1] - 4))).all()


# --- position-embedding similarity ------------------------------------------------------------------------------


def sincos_table(gh: int, gw: int, dim: int, max_freq: float, temperature: float = 10000.0) -> np.ndarray:
    """A 2-D sin-cos position table (gh*gw, dim): half the channels encode the row, half the column,
    at dim/4 frequencies from max_freq down by powers of temperature."""
    q = dim // 4
    omega = max_freq / temperature ** (np.arange(q) / q)

    def encode(x):
        a = np.outer(x.ravel(), omega)
        return np.concatenate([np.sin(a), np.cos(a)], axis=1)

    r, c = np.meshgrid(np.arange(gh), np.arange(gw), indexing="ij")
    return np.concatenate([encode(r), encode(c)], axis=1)


def test_position_similarity_matches_numpy():
    gh, gw, prefix, D = 3, 4, 2, 16
    pos = torch.randn(1, prefix + gh * gw, D, generator=torch.Generator().manual_seed(0))
    P = pos[0, prefix:].double().numpy()
    expected = np.zeros((gh, gw, gh, gw))
    for a in range(gh * gw):
        for b in range(gh * gw):
            expected[a // gw, a % gw, b // gw, b % gw] = P[a] @ P[b] / (np.linalg.norm(P[a]) * np.linalg.norm(P[b]))
    got = ins.position_similarity(pos, prefix, (gh, gw))
    assert_close(got, torch.from_numpy(expected).float(), 1e-6, "cosine similarity")


def test_sincos_position_embeddings_peak_at_their_own_patch_and_fall_off_with_distance():
    gh, gw, D = 5, 7, 64
    # Every frequency at most pi / (side - 1): cos(omega * d) falls as d grows across the whole grid.
    max_freq = math.pi / (max(gh, gw) - 1)
    table = sincos_table(gh, gw, D, max_freq, temperature=100.0)
    pos = torch.cat([torch.randn(1, 1, D), torch.from_numpy(table).float()[None]], dim=1)  # (1, 1 + gh*gw, D)
    sim = ins.position_similarity(pos, 1, (gh, gw)).double()
    # By hand: each frequency contributes sin(a)sin(b) + cos(a)cos(b) = cos(omega * (a - b)) per axis, and
    # every position has the same norm, so the similarity is the mean over both axes' frequencies.
    omega = max_freq / 100.0 ** (np.arange(D // 4) / (D // 4))
    for i in range(gh):
        for j in range(gw):
            m = sim[i, j]
            assert m[i, j] == pytest.approx(1.0, abs=1e-6)
            assert (m.flatten().argmax().item()) == i * gw + j, f"map ({i}, {j}) peaks elsewhere"
            for k in range(gh):
                for l in range(gw):
                    hand = (np.cos(omega * (k - i)).sum() + np.cos(omega * (l - j)).sum()) / (D // 2)
                    assert m[k, l].item() == pytest.approx(hand, abs=1e-5)
            # Each step further from the own patch, along a row or a column, lowers the similarity.
            row, col = m[i], m[:, j]
            assert (row[j + 1:].diff() < 0).all() and (row[: j + 1].diff() > 0).all(), f"row of ({i}, {j})"
            assert (col[i + 1:].diff() < 0).all() and (col[: i + 1].diff() > 0).all(), f"column of ({i}, {j})"
    # The usual table (frequencies from 1 down, temperature 10000) also peaks at each own patch.
    sim = ins.position_similarity(torch.from_numpy(sincos_table(gh, gw, D, 1.0))[None], 0, (gh, gw))
    assert (sim.reshape(gh * gw, gh * gw).argmax(1) == torch.arange(gh * gw)).all()


def test_position_embeddings_that_do_not_fit_the_grid_are_refused():
    with pytest.raises(ValueError, match="not a 3x3 grid"):
        ins.position_similarity(torch.randn(1, 1 + 8, 4), 1, (3, 3))


def test_draw_position_similarity_uses_one_colour_scale():
    gh, gw = 3, 4
    sim = ins.position_similarity(torch.randn(1, 1 + gh * gw, 8, generator=torch.Generator().manual_seed(3)), 1, (gh, gw))
    cell, gap = 5, 3  # map_px=20 over a side of 4 cells
    img = np.asarray(ins.draw_position_similarity(sim, map_px=20, gap=gap))
    top, bottom = tuple(colorize(np.array([1.0]))[0]), tuple(colorize(np.array([0.0]))[0])
    lo, hi = sim.min().item(), sim.max().item()
    for i in range(gh):
        for j in range(gw):
            y0, x0 = i * (gh * cell + gap), j * (gw * cell + gap)  # map (i, j)'s top-left corner
            assert tuple(img[y0 + i * cell + 2, x0 + j * cell + 2]) == top, f"map ({i}, {j}) at its own patch"
            k, l = np.unravel_index(sim[i, j].argmin().item(), (gh, gw))
            if sim[i, j, k, l].item() == lo:
                assert tuple(img[y0 + k * cell + 2, x0 + l * cell + 2]) == bottom
    # Every map is drawn on the same scale: an entry's colour is colorize((value - lo) / (hi - lo)).
    k, l = 1, 2
    expected = colorize(np.array([(sim[0, 0, k, l].item() - lo) / (hi - lo)]))[0]
    assert tuple(img[k * cell + 2, l * cell + 2]) == tuple(expected)


# --- patch-embedding filters ------------------------------------------------------------------------------------


def test_filter_components_match_numpy_eigh():
    w = torch.randn(40, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    comps, ratio = ins.filter_components(w, k=10)
    assert comps.shape == (10, 3, 4, 4) and ratio.shape == (10,)
    X = w.double().numpy().reshape(40, -1)
    X = X - X.mean(0)
    vals, vecs = np.linalg.eigh(X.T @ X)  # ascending
    vals, vecs = vals[::-1], vecs[:, ::-1]
    got = comps.reshape(10, -1).double().numpy()
    for k in range(10):
        overlap = abs(got[k] @ vecs[:, k])
        assert overlap == pytest.approx(1.0, abs=1e-5), f"component {k}: |cos| = {overlap}"
    assert_close(ratio, torch.from_numpy((vals / vals.sum())[:10].copy()).float(), 1e-6, "explained variance ratio")
    assert (ratio[:-1] >= ratio[1:]).all()
    # Only min(D, C*p*p) components exist.
    assert ins.filter_components(torch.randn(5, 1, 2, 2), k=28)[0].shape == (4, 1, 2, 2)


def test_pca_of_filters_made_of_two_patterns_recovers_them():
    C, p, D = 3, 4, 300
    g = torch.Generator().manual_seed(1)
    checker = torch.tensor([[(-1.0) ** (r + c) for c in range(p)] for r in range(p)])  # (p, p)
    left_right = torch.tensor([[1.0 if c < p // 2 else -1.0 for c in range(p)] for r in range(p)])
    A = torch.stack([checker, -checker, checker])  # (C, p, p), orthogonal to B
    B = torch.stack([left_right, left_right, torch.zeros(p, p)])
    A, B = A / A.norm(), B / B.norm()
    a = 3.0 * torch.randn(D, 1, 1, 1, generator=g)  # A varies three times as much as B
    b = 1.0 * torch.randn(D, 1, 1, 1, generator=g)
    w = 0.5 + a * A + b * B + 0.01 * torch.randn(D, C, p, p, generator=g)  # an offset the centring removes
    comps, ratio = ins.filter_components(w, k=28)
    assert comps.shape == (28, C, p, p)
    for k, pattern in enumerate((A, B)):
        overlap = (comps[k] * pattern).sum().abs().item()
        assert overlap > 0.999, f"component {k} is not pattern {k} (|cos| = {overlap:.4f})"
    assert ratio[:2].sum() > 0.99
    assert ratio[0] / ratio[1] == pytest.approx(9.0, rel=0.3)
    # The sign is fixed: each component's largest entry is positive.
    flat = comps.reshape(len(comps), -1)
    assert (flat.gather(1, flat.abs().argmax(1, keepdim=True)) > 0).all()


def test_draw_filters_tiles_each_filter_normalised_on_its_own():
    g = torch.Generator().manual_seed(2)
    grey = torch.randn(5, 1, 4, 4, generator=g) * torch.tensor([1, 10, 100, 0.1, 1]).view(5, 1, 1, 1)
    img = np.asarray(ins.draw_filters(grey, tile_px=32, columns=3, gap=2))
    assert img.shape == (2 * 32 + 2, 3 * 32 + 2 * 2, 3)
    for t in range(5):
        y, x = (t // 3) * 34, (t % 3) * 34
        block = img[y:y + 32, x:x + 32]
        assert (block[..., 0] == block[..., 1]).all() and (block[..., 1] == block[..., 2]).all(), "grey"
        assert block.min() == 0 and block.max() == 255, f"tile {t} spans the full range"
        # Enlarged without smoothing, in the filter's own orientation.
        f = grey[t, 0]
        expected = ((f - f.min()) / (f.max() - f.min()) * 255).round().numpy()
        assert (block[::8, ::8, 0] == expected).all()
    rgb = torch.randn(2, 3, 4, 4, generator=g)
    img = np.asarray(ins.draw_filters(rgb, tile_px=4))
    assert (img[:4, :4] != img[:4, :4, :1]).any(), "RGB filters are drawn in colour"


# --- the patch grid ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape, p, prefix, counts", [
    ((1, 28, 28), 4, 1, dict(patches=49, grid=(7, 7), sequence_length=50, prefix=["class"])),
    ((3, 224, 224), 16, 2, dict(patches=196, grid=(14, 14), sequence_length=198, prefix=["class", "distillation"])),
    ((3, 32, 48), 16, 1, dict(patches=6, grid=(2, 3), sequence_length=7, prefix=["class"])),
])
def test_patch_grid_counts_and_draws_the_crop(shape, p, prefix, counts):
    crop = torch.randint(0, 256, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    img, info = ins.patch_grid(crop, p, prefix)
    for key, value in counts.items():
        assert info[key] == value, key
    assert info["prefix_tokens"] == prefix and info["crop"] == shape[1:] and info["patch_size"] == p
    scale = img.width // shape[2]
    assert img.size == (shape[2] * scale, shape[1] * scale) and img.mode == "RGB"
    assert p * scale >= 40, "small crops are enlarged so each patch is at least 40 pixels"
    a = np.asarray(img)
    gh, gw = counts["grid"]
    cell = p * scale
    for r in range(gh):
        for c in range(gw):
            # Just inside each patch's corner, away from the lines and the number: the crop, enlarged.
            y, x = r * cell + scale // 4 + 2, c * cell + scale // 4 + 2
            assert (a[y, x] == crop[:, (y // scale), (x // scale)].expand(3).numpy()).all(), (r, c)
            assert tuple(a[r * cell, c * cell + cell // 2]) == ins.GRID_COLOR  # the line above it
    assert tuple(a[-1, cell // 2]) == ins.GRID_COLOR and tuple(a[cell // 2, -1]) == ins.GRID_COLOR  # closing lines
    # The numbers are drawn: the middle of each patch has white (text) and black (its outline).
    mid = a[cell // 4: cell - cell // 4, cell // 4: cell - cell // 4].reshape(-1, 3)
    assert (mid == 255).all(1).any() and (mid == 0).all(1).any()


# --- the forward pass, step by step ----------------------------------------------------------------------------


def small_vit(distilled=False, global_pool="token", seed=1) -> VisionTransformer:
    cfg = ViTConfig(img_size=16, patch_size=4, in_chans=3, num_classes=5, embed_dim=32, depth=3, num_heads=4,
                    mlp_dim=64, distilled=distilled, global_pool=global_pool)
    return randomize_(VisionTransformer(cfg), seed=seed).eval()


def test_the_model_returns_its_tokens_only_when_asked():
    model = small_vit()
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = model(x)
        logits, tokens = model(x, return_tokens=True)
        logits2, attns, tokens2 = model(x, return_attn=True, return_tokens=True)
        _, attns_only = model(x, return_attn=True)
    assert isinstance(plain, torch.Tensor)
    assert_close(logits, plain, 1e-6, "logits with tokens")
    assert_close(logits2, plain, 1e-5, "logits with attention and tokens")
    assert len(tokens) == 1 + 3 and all(t.shape == (2, 1 + 16, 32) for t in tokens)
    assert_close(tokens[0], model.embed(x), 0, "tokens[0] is the embedding's output")
    for a, b in zip(tokens[1:], tokens2[1:]):
        assert_close(a, b, 1e-5, "the two attention paths give the same tokens")
    for a, b in zip(attns, attns_only):
        assert_close(a, b, 0, "attention")
    # The last block's tokens, through the final LayerNorm and the head, are the logits.
    assert_close(model.head(model.norm(tokens[-1])[:, 0]), plain, 1e-5, "head of the last tokens")


def image_for(size: int, seed: int = 0):
    from PIL import Image

    g = np.random.default_rng(seed)
    return Image.fromarray(g.integers(0, 256, (size, size, 3), dtype=np.uint8))


def transformers_readout(ref, x, distilled: bool):
    """Per-layer logits through transformers' own final LayerNorm and classifier(s), from output_hidden_states."""
    m = ref.model
    with torch.no_grad():
        out = m(pixel_values=x, output_hidden_states=True, output_attentions=True)
        body = m.deit if distilled else m.vit
        per_layer = []
        for h in out.hidden_states[1:]:
            h = body.layernorm(h)
            if distilled:
                per_layer.append((m.cls_classifier(h[:, 0]) + m.distillation_classifier(h[:, 1])) / 2)
            else:
                per_layer.append(m.classifier(h[:, 0]))
    return torch.cat(per_layer), out


@pytest.mark.parametrize("distilled", [False, True], ids=["vit", "deit-distilled"])
def test_the_answer_after_every_block_is_transformers_own(tmp_path, distilled):
    """Layer by layer, the walk's read-out equals transformers' output_hidden_states through its own final norm and
    classifier (both heads averaged for distilled DeiT); its tokens equal the hidden states; the patch attention
    equals transformers' output_attentions row; the similarity equals numpy's cosine of transformers' states."""
    from conftest import make_transformers
    from vit_demo import load_classifier

    ref = make_transformers(tmp_path / "ckpt", "small", distilled=distilled, num_hidden_layers=3)
    ref.model.set_attn_implementation("eager")  # output_attentions needs the explicit path
    clf = load_classifier(str(ref.path), device="cpu", dtype=torch.float32)
    image = image_for(40)
    walk = clf.walk(image)
    x = clf.preprocess(image)
    want, out = transformers_readout(ref, x, distilled)
    assert walk["layer_logits"].shape == (3, 10)
    assert_close(walk["layer_logits"], want, 2e-4, "per-layer logits")
    assert_close(walk["layer_logits"][-1], out.logits[0], 2e-4, "the last layer's answer is the model's")
    # The read-outs differ from layer to layer: the test would see a read-out of the wrong layer.
    assert (walk["layer_logits"][0] - walk["layer_logits"][-1]).abs().max() > 1e-2
    for mine, theirs in zip(walk["tokens"], out.hidden_states):
        assert_close(mine, theirs[0], 2e-4, "tokens")

    prefix = clf.config.num_prefix_tokens
    gh, gw = clf.grid(walk["crop"])
    for row, col, layer, head in [(0, 0, 0, None), (2, 1, 2, 3), (3, 3, 1, 0)]:
        view = ins.patch_view(walk["attns"], walk["tokens"], prefix, (gh, gw), row, col, layer, head)
        q = prefix + row * gw + col
        assert view["token"] == q
        a = out.attentions[layer][0]  # (heads, N, N)
        a = a.mean(0) if head is None else a[head]
        assert_close(view["attention"], a[q, prefix:].reshape(gh, gw), 1e-5, f"attention of {row, col}")
        assert_close(view["attention_prefix"], a[q, :prefix], 1e-5, "attention to the prefix")
        T = out.hidden_states[layer + 1][0].double().numpy()  # (N, D)
        cos = T @ T[q] / (np.linalg.norm(T, axis=1) * np.linalg.norm(T[q]))
        assert_close(view["similarity"], torch.from_numpy(cos[prefix:].reshape(gh, gw)), 1e-5, "similarity")
        assert_close(view["similarity_prefix"], torch.from_numpy(cos[:prefix]), 1e-5, "similarity to the prefix")
        assert view["similarity"][row, col].item() == pytest.approx(1.0, abs=1e-6)


def test_the_answer_after_every_block_of_an_average_pooled_timm_model(tmp_path):
    """timm with global_pool="avg": the tokens after each block (hooked on timm's own blocks) through timm's
    forward_head (norm, mean of the patch tokens, fc_norm, head) equal the walk's read-outs."""
    from conftest import make_timm
    from vit_demo import load_classifier

    ref = make_timm(tmp_path / "ckpt", "vit_tiny_patch16_224", img_size=32, patch_size=8, depth=3, global_pool="avg",
                    num_classes=10)
    clf = load_classifier(str(ref.path), device="cpu", dtype=torch.float32)
    assert clf.config.global_pool == "avg"
    image = image_for(48, seed=3)
    walk = clf.walk(image)
    states = []
    hooks = [blk.register_forward_hook(lambda m, i, o: states.append(o)) for blk in ref.model.blocks]
    try:
        with torch.no_grad():
            final = ref.model(clf.preprocess(image))
            want = torch.cat([ref.model.forward_head(ref.model.norm(s)) for s in states])
    finally:
        for h in hooks:
            h.remove()
    assert_close(walk["layer_logits"], want, 2e-4, "per-layer logits")
    assert_close(walk["layer_logits"][-1], final[0], 2e-4, "the last layer's answer is the model's")
    assert (walk["layer_logits"][0] - walk["layer_logits"][-1]).abs().max() > 1e-2
    # The class token does not reach the answer: changing it changes no read-out.
    tokens = torch.stack(walk["tokens"][1:])  # (depth, N, D)
    moved = tokens.clone()
    moved[:, 0] += 5.0
    assert_close(ins.readout_logits(clf.model, moved), ins.readout_logits(clf.model, tokens), 1e-5, "class token")


def np_token_colours(tokens: np.ndarray, num_prefix: int, grid) -> np.ndarray:
    """PCA by the covariance's eigenvectors, each component min-max scaled: (gh, gw, 3)."""
    X = tokens[num_prefix:] - tokens[num_prefix:].mean(0)
    vals, vecs = np.linalg.eigh(X.T @ X)
    proj = X @ vecs[:, ::-1][:, :3]
    proj = (proj - proj.min(0)) / (proj.max(0) - proj.min(0))
    return proj.reshape(*grid, 3)


def test_token_colours_match_numpy_up_to_each_components_sign():
    model = small_vit(seed=4)
    x = torch.randn(1, 3, 16, 24, generator=torch.Generator().manual_seed(5))  # a 4x6 grid
    with torch.no_grad():
        _, tokens = model(x, return_tokens=True)
    for depth in (0, 2):
        T = tokens[depth][0]
        got, ratio = ins.token_colours(T, 1, (4, 6))
        want = np_token_colours(T.double().numpy(), 1, (4, 6))
        assert got.shape == (4, 6, 3) and 0 <= got.min() and got.max() <= 1
        for k in range(3):
            g, w = got[..., k].double(), torch.from_numpy(want[..., k].copy())
            diff = min((g - w).abs().max().item(), (g - (1 - w)).abs().max().item())
            assert diff <= 1e-5, f"depth {depth}, component {k}: {diff:.3g}"
        Xc = T[1:].double() - T[1:].double().mean(0)
        eig = np.linalg.eigvalsh((Xc.T @ Xc).numpy())[::-1]
        assert_close(ratio, torch.from_numpy((eig / eig.sum())[:3].copy()).float(), 1e-5, "explained variance")
    with pytest.raises(ValueError, match="do not fit"):
        ins.token_colours(tokens[0][0], 1, (4, 5))


def test_tokens_that_copy_their_patches_separate_two_patterns_in_rgb():
    """A model whose patch embedding copies each patch's pixels into its token (an identity filter bank, no
    position embedding): patches of two known patterns, laid out as a chessboard, get two colours, the same within
    each pattern and far apart between them."""
    p, C = 2, 3
    cfg = ViTConfig(img_size=8, patch_size=p, in_chans=C, num_classes=2, embed_dim=C * p * p, depth=1, num_heads=1,
                    mlp_dim=8)
    model = VisionTransformer(cfg).eval()
    with torch.no_grad():
        model.patch_embed.proj.weight.copy_(torch.eye(C * p * p).reshape(C * p * p, C, p, p))
        model.patch_embed.proj.bias.zero_()
        model.pos_embed.zero_()
    stripes = torch.tensor([[1.0, 1.0], [-1.0, -1.0]]).expand(C, p, p) * torch.tensor([1.0, 0.0, 0.0]).view(C, 1, 1)
    dots = torch.tensor([[1.0, -1.0], [-1.0, 1.0]]).expand(C, p, p) * torch.tensor([0.0, 0.5, 1.0]).view(C, 1, 1)
    x = torch.zeros(1, C, 8, 8)
    which = torch.zeros(4, 4, dtype=torch.bool)
    for r in range(4):
        for c in range(4):
            which[r, c] = (r + c) % 2 == 0
            x[0, :, r * p:(r + 1) * p, c * p:(c + 1) * p] = stripes if which[r, c] else dots
    with torch.no_grad():
        _, tokens = model(x, return_tokens=True)
    flat = tokens[0][0, 1:].reshape(4, 4, C, p, p)
    assert_close(flat[0, 0], stripes, 1e-6, "the token is the patch")
    colours, ratio = ins.token_colours(tokens[0][0], 1, (4, 4))
    a, b = colours[which], colours[~which]  # (8, 3) each
    assert (a - a[0]).abs().max() < 1e-6 and (b - b[0]).abs().max() < 1e-6, "one colour per pattern"
    assert (a[0] - b[0]).abs().max() > 0.99, f"the two colours are far apart: {a[0].tolist()} vs {b[0].tolist()}"
    assert ratio[0] == pytest.approx(1.0, abs=1e-6)  # two patterns: one direction holds all the variance
    img = np.asarray(ins.draw_token_colours(colours, side=64))
    assert img.shape == (64, 64, 3)
    assert tuple(img[8, 8]) == tuple((colours[0, 0] * 255).round().to(torch.uint8).tolist())


def test_a_picked_patch_is_outlined_and_its_map_coloured_on_its_own_range():
    from vit_demo.explain import colorize

    crop = torch.full((1, 8, 12), 100, dtype=torch.uint8)  # a 2x3 grid of 4-pixel patches
    values = torch.tensor([[0.0, 1.0, 2.0], [3.0, 4.0, 8.0]])
    img = np.asarray(ins.draw_patch_map(crop, values, 4, 1, 2, "attention weight", alpha=1.0))
    scale = ins.cell_scale(4)
    cell = 4 * scale
    assert img.shape[1] == 3 * cell and img.shape[0] > 2 * cell  # the colour bar under the map
    assert tuple(img[cell // 2, cell // 2]) == tuple(colorize(np.array([0.0]))[0]), "lowest value: darkest"
    assert tuple(img[cell + cell // 2, 2 * cell + cell // 2]) == tuple(colorize(np.array([1.0]))[0]), "highest: brightest"
    assert tuple(img[cell + cell // 2, cell + cell // 2]) == tuple(colorize(np.array([0.5]))[0])
    assert tuple(img[cell, 2 * cell + cell // 2]) == ins.PICK_COLOR, "the picked patch's outline"
    assert tuple(img[0, cell // 2]) != ins.PICK_COLOR
    pick = np.asarray(ins.draw_pick(crop, 4, 0, 1))
    assert tuple(pick[0, cell + cell // 2]) == ins.PICK_COLOR and tuple(pick[cell // 2, cell // 2]) == (100, 100, 100)


# --- the code that computes each step --------------------------------------------------------------------------

# Which function of model.py computes each step, and an expression that must be among its lines.
STEP_FUNCTIONS = {
    "patches": ("VisionTransformer.embed", "self.patch_embed("),
    "embedding": ("PatchEmbed.forward", "self.proj("),
    "prefix": ("VisionTransformer.embed", "self.cls_token"),
    "blocks": ("VisionTransformer.forward", "blk("),
    "attention": ("Attention.forward", "softmax("),
    "head": ("VisionTransformer.forward_head", "self.head("),
}


def test_each_code_excerpt_is_verbatim_in_model_py_inside_the_function_that_computes_the_step():
    import ast
    import textwrap
    from pathlib import Path

    source = (Path(ins.__file__).parent / "model.py").read_text()
    lines = source.splitlines(keepends=True)
    functions = {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, ast.FunctionDef):
                    functions[f"{node.name}.{item.name}"] = (item.lineno, item.end_lineno)
    assert set(ins.STEP_CODE) == set(STEP_FUNCTIONS)
    for step, (function, expression) in STEP_FUNCTIONS.items():
        excerpts = ins.step_code(step)
        assert excerpts[0]["function"] == function, step
        assert any(expression in e["code"] for e in excerpts), f"{step}: {expression} is not among its lines"
        for e in excerpts:
            first, last = functions[e["function"]]
            assert first < e["start"] <= e["end"] <= last, f"{step}: lines {e['start']}-{e['end']} outside {e['function']}"
            assert e["code"] == textwrap.dedent("".join(lines[e["start"] - 1 : e["end"]])).rstrip(), f"{step}: not verbatim"
            assert 1 <= e["end"] - e["start"] + 1 <= 10, f"{step}: a few lines, not {e['end'] - e['start'] + 1}"
    with pytest.raises(LookupError):
        ins.code_excerpt("PatchEmbed", "forward", "no such line", "return")

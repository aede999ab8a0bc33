"""The model itself: the fast and explicit attention paths agree; position embeddings resample like timm's."""

import torch

from conftest import assert_close, make_timm, make_transformers
from vit_demo import ViTConfig, VisionTransformer, load_classifier


def test_sdpa_and_explicit_attention_agree_and_rows_sum_to_one():
    torch.manual_seed(0)
    model = VisionTransformer(ViTConfig(img_size=64, patch_size=16, embed_dim=96, depth=3, num_heads=4, mlp_dim=192, num_classes=7, distilled=True)).eval()
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        fast = model(x)
        explicit, attns = model(x, return_attn=True)
    assert_close(explicit, fast, 1e-5, "SDPA vs explicit softmax")
    assert len(attns) == 3
    for a in attns:
        assert a.shape == (3, 4, 2 + 16, 2 + 16)  # (B, heads, prefix + patches, prefix + patches)
        assert (a >= 0).all()
        assert_close(a.sum(-1), torch.ones(3, 4, 18), 1e-5, "attention rows sum to 1")


def test_224_checkpoint_runs_at_384_like_timm(tmp_path):
    """Position embeddings are resampled bicubically to the 24x24 grid, as timm's loader does."""
    import timm
    from timm.models.vision_transformer import checkpoint_filter_fn

    kwargs = dict(embed_dim=64, num_heads=4, depth=2, num_classes=10)
    ref224 = make_timm(tmp_path, "vit_small_patch16_224", **kwargs)
    ref384 = timm.create_model("vit_small_patch16_224", pretrained=False, img_size=384, **kwargs).eval()
    ref384.load_state_dict(checkpoint_filter_fn(ref224.model.state_dict(), ref384))
    clf = load_classifier(ref224.path, device="cpu")
    x = torch.randn(2, 3, 384, 384, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert_close(clf.model(x), ref384(x), 1e-4, "384 input through resampled position embeddings")


def test_384_matches_transformers_interpolate_pos_encoding(tmp_path):
    ref = make_transformers(tmp_path, "small", image_size=32, patch_size=8)
    clf = load_classifier(ref.path, device="cpu")
    x = torch.randn(1, 3, 48, 48, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ref.model(pixel_values=x, interpolate_pos_encoding=True).logits
        assert_close(clf.model(x), expected, 1e-4, "transformers interpolate_pos_encoding")

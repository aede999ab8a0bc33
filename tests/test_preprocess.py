"""vit_demo's input tensor equals each reference library's own preprocessing of a real photo (<= 1e-3)."""

import pytest
from PIL import Image

from conftest import EXAMPLES, assert_close, lay_out_hub_cache, make_timm, make_torchvision, make_transformers
from vit_demo import load_classifier
from vit_demo.preprocess import load_image

ATOL = 1e-3


@pytest.mark.parametrize("photo_name", ["chelsea.jpg", "astronaut.jpg"])
@pytest.mark.parametrize("distilled", [False, True], ids=["ViTImageProcessor", "DeiTImageProcessor"])
def test_transformers_image_processor(tmp_path, photo_name, distilled):
    from transformers import AutoImageProcessor

    ref = make_transformers(tmp_path, "small", distilled=distilled, image_size=224, patch_size=32)
    photo = Image.open(EXAMPLES / photo_name)
    expected = AutoImageProcessor.from_pretrained(ref.path)(photo, return_tensors="pt").pixel_values
    actual = load_classifier(ref.path, device="cpu").preprocess(photo)
    assert_close(actual, expected, ATOL, f"{type(AutoImageProcessor.from_pretrained(ref.path)).__name__}")


@pytest.mark.parametrize("photo_name", ["chelsea.jpg", "rocket.jpg"])
@pytest.mark.parametrize("arch", ["vit_base_patch16_224.augreg2_in21k_ft_in1k", "deit_tiny_patch16_224.fb_in1k", "vit_small_patch16_384.augreg_in21k_ft_in1k"])
def test_timm_create_transform(tmp_path, photo_name, arch):
    from timm.data import create_transform, resolve_data_config

    ref = make_timm(tmp_path, arch, depth=1)
    photo = Image.open(EXAMPLES / photo_name)
    expected = create_transform(**resolve_data_config({}, model=ref.model))(photo.convert("RGB")).unsqueeze(0)
    actual = load_classifier(ref.path, device="cpu").preprocess(photo)
    assert_close(actual, expected, ATOL, arch)


def test_torchvision_weights_transforms(tmp_path):
    from torchvision.models import ViT_B_16_Weights

    ref = make_torchvision(tmp_path, "base", "vit_b_16", suffix=".safetensors")
    photo = Image.open(EXAMPLES / "coffee.jpg")
    expected = ViT_B_16_Weights.IMAGENET1K_V1.transforms()(photo).unsqueeze(0)
    actual = load_classifier(ref.path, device="cpu").preprocess(photo)
    assert_close(actual, expected, ATOL, "torchvision")


def test_exif_orientation_is_applied_before_classifying():
    """A photo stored sideways with EXIF orientation 6 (rotate 90 clockwise) is put upright."""
    upright = Image.new("RGB", (40, 20), "white")
    upright.paste((255, 0, 0), (0, 0, 10, 20))  # red band on the left
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # what a camera writes, 20x40
    exif = stored.getexif()
    exif[0x0112] = 6
    path_img = Image.new("RGB", stored.size)
    path_img.paste(stored)
    import io

    buf = io.BytesIO()
    path_img.save(buf, "JPEG", exif=exif.tobytes(), quality=95)
    reread = Image.open(io.BytesIO(buf.getvalue()))
    fixed = load_image(reread)
    assert fixed.size == (40, 20)
    r, g, b = fixed.getpixel((2, 10))
    assert r > 200 and g < 60, (r, g, b)


def test_transparency_is_flattened_onto_white_and_grayscale_becomes_rgb():
    rgba = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    assert load_image(rgba).getpixel((0, 0)) == (255, 255, 255)
    assert load_image(Image.new("L", (8, 8), 100)).getpixel((0, 0)) == (100, 100, 100)
    assert load_image(Image.new("I;16", (8, 8), 300)).mode == "RGB"


# --- a repo only partly in the Hugging Face cache ------------------------------------------------------------


def test_half_cached_timm_repo_fetches_its_config_instead_of_imagenet_defaults(tmp_path, fake_hub):
    """timm's `create_model(..., pretrained=True)` caches only model.safetensors. The repo's config.json (mean 0.5,
    crop 0.9 for an augreg model, not ImageNet's 0.485 and 0.875) is fetched from the Hub before loading."""
    from timm.data import create_transform, resolve_data_config

    repo = "timm/vit_small_patch16_224.augreg_in21k_ft_in1k"
    ref = make_timm(tmp_path / "ckpt", repo.split("/")[1], depth=1)
    fake_hub.serve(repo, ref.path)
    lay_out_hub_cache(fake_hub.hf_home, repo, ref.path, only=("model.safetensors",))
    photo = Image.open(EXAMPLES / "chelsea.jpg")
    data_config = resolve_data_config({}, model=ref.model)
    assert data_config["mean"] == (0.5, 0.5, 0.5) and data_config["crop_pct"] == 0.9  # not the defaults
    expected = create_transform(**data_config)(photo.convert("RGB")).unsqueeze(0)
    clf = load_classifier(repo, device="cpu")
    assert_close(clf.preprocess(photo), expected, ATOL, "half-cached timm repo")
    assert any(p.endswith("/config.json") for p in fake_hub), fake_hub


def test_half_cached_deit_repo_fetches_its_preprocessor_config(tmp_path, fake_hub):
    """A transformers DeiT cached without preprocessor_config.json (resize 256, crop 224 in the real one) fetches it."""
    from transformers import AutoImageProcessor

    repo = "facebook/deit-test-distilled"
    ref = make_transformers(tmp_path / "ckpt", "small", distilled=True, image_size=224, patch_size=32)
    fake_hub.serve(repo, ref.path)
    lay_out_hub_cache(fake_hub.hf_home, repo, ref.path, only=("model.safetensors", "config.json"))
    photo = Image.open(EXAMPLES / "chelsea.jpg")
    expected = AutoImageProcessor.from_pretrained(ref.path)(photo, return_tensors="pt").pixel_values
    assert_close(load_classifier(repo, device="cpu").preprocess(photo), expected, ATOL, "half-cached DeiT repo")
    assert any(p.endswith("/preprocessor_config.json") for p in fake_hub), fake_hub


def test_a_file_the_cache_knows_is_missing_is_not_fetched(tmp_path, offline_hub):
    """huggingface_hub records a file a repo does not have (`.no_exist/<sha>/<name>`): such a repo loads offline
    with the format's defaults, as it would online."""
    repo = "someone/vit-without-preprocessor-config"
    ref = make_transformers(tmp_path / "ckpt", "small", image_size=224, patch_size=32)
    sha = lay_out_hub_cache(offline_hub, repo, ref.path, only=("model.safetensors", "config.json"))
    no_exist = offline_hub / "hub" / f"models--{repo.replace('/', '--')}" / ".no_exist" / sha
    no_exist.mkdir(parents=True)
    (no_exist / "preprocessor_config.json").touch()
    pp = load_classifier(repo, device="cpu").preprocessor.cfg
    assert pp.mean == (0.5, 0.5, 0.5) and pp.resize == (224, 224) and pp.crop is None  # ViTImageProcessor's defaults


def test_a_repo_downloaded_once_loads_offline_even_without_every_metadata_file(tmp_path, fake_hub, monkeypatch):
    """A first load downloads the repo and records which metadata files it lacks, so that the next load, offline,
    does not take the cache for half a download."""
    from huggingface_hub import constants

    repo = "someone/vit-without-preprocessor-config"
    ref = make_transformers(tmp_path / "ckpt", "small", image_size=224, patch_size=32)
    (ref.path / "preprocessor_config.json").unlink()
    fake_hub.serve(repo, ref.path)
    online = load_classifier(repo, device="cpu").preprocessor.cfg
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    asked = len(fake_hub)
    assert load_classifier(repo, device="cpu").preprocessor.cfg == online
    assert len(fake_hub) == asked, "the offline load asked the Hub"


@pytest.mark.parametrize("resample", [4, 5], ids=["BOX", "HAMMING"])
def test_box_and_hamming_resampling_as_transformers_pil_processor(tmp_path, resample):
    """PIL's resample codes 4 (BOX) and 5 (HAMMING) resize with PIL, as transformers' PIL image processor does
    (its torchvision one cannot resize tensors with them)."""
    import json

    from transformers.models.vit import ViTImageProcessorPil

    ref = make_transformers(tmp_path, "small", image_size=224, patch_size=32)
    pp_path = ref.path / "preprocessor_config.json"
    pp_path.write_text(json.dumps({**json.loads(pp_path.read_text()), "resample": resample}))
    photo = Image.open(EXAMPLES / "chelsea.jpg")
    expected = ViTImageProcessorPil(**json.loads(pp_path.read_text()))(photo, return_tensors="pt").pixel_values
    assert_close(load_classifier(ref.path, device="cpu").preprocess(photo), expected, ATOL, f"resample {resample}")

"""vit_demo's input tensor equals each reference library's own preprocessing of a real photo (<= 1e-3)."""

import pytest
from PIL import Image

from conftest import EXAMPLES, assert_close, make_timm, make_torchvision, make_transformers
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

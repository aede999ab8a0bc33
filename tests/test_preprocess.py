"""vit_demo's input tensor equals each reference library's own preprocessing of a real photo (<= 1e-3)."""

import numpy as np
import pytest
from PIL import Image

from conftest import EXAMPLES, assert_close, lay_out_hub_cache, make_timm, make_torchvision, make_transformers, with_garbage_exif
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


@pytest.mark.parametrize("photo_name", ["chelsea.jpg", "rocket.jpg"])  # landscape and portrait photos
@pytest.mark.parametrize("input_size, crop_pct, crop_mode", [
    ((3, 224, 320), 0.875, "center"), ((3, 384, 192), 1.0, "center"), ((3, 224, 320), 0.9, "squash"),
])
def test_timm_non_square_input_keeps_the_aspect_ratio_like_timm(photo_name, input_size, crop_pct, crop_mode):
    """A non-square input_size: timm scales the photo, aspect kept, to cover the size over crop_pct, then crops
    (ResizeKeepRatio); "squash" scales each side on its own. Compared with timm's own transform."""
    from timm.data import create_transform

    from vit_demo.preprocess import Preprocessor, from_timm

    cfg = dict(input_size=input_size, crop_pct=crop_pct, crop_mode=crop_mode, interpolation="bicubic",
               mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    photo = Image.open(EXAMPLES / photo_name).convert("RGB")
    expected = create_transform(**cfg)(photo).unsqueeze(0)
    assert_close(Preprocessor(from_timm(cfg))(photo), expected, ATOL, f"{input_size} {crop_mode}")


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


# --- more than 8 bits per pixel ---------------------------------------------------------------------------------


def gray_photo() -> np.ndarray:
    return np.asarray(Image.open(EXAMPLES / "chelsea.jpg").convert("L"))  # (300, 451) uint8


@pytest.mark.parametrize("bits", [16, 12, 10])
def test_high_bit_depth_keeps_its_contrast(tmp_path, bits):
    """A photo stored in a 16-bit PNG with `bits` significant bits (12-bit camera data: 0..4095) comes back as
    the same photo in 8 bits, not as 0..15."""
    gray = gray_photo()
    top = 2**bits - 1
    values = np.round(gray * (top / 255)).astype(np.uint16)
    Image.fromarray(values).save(tmp_path / "photo.png")
    with Image.open(tmp_path / "photo.png") as im:
        assert im.mode == "I;16"
        got = np.asarray(load_image(im, "L")).astype(int)
    assert np.array_equal(got, np.round(values * (255 / top)).astype(int)), "not scaled by the bit depth"
    assert np.abs(got - gray).max() <= 1 and abs(got.std() - gray.std()) < 0.5  # the photo, with its contrast


def test_big_endian_and_32_bit_integers_are_scaled_alike():
    values = (gray_photo().astype(np.uint16) << 4)  # 12 bits
    little = load_image(Image.fromarray(values), "L")
    big = load_image(Image.frombytes("I;16B", values.shape[::-1], values.astype(">u2").tobytes()), "L")
    wide = load_image(Image.fromarray(values.astype(np.int32)), "L")
    assert np.array_equal(np.asarray(big), np.asarray(little)) and np.array_equal(np.asarray(wide), np.asarray(little))
    eight = load_image(Image.fromarray(gray_photo().astype(np.int32)), "L")  # mode "I" holding 8-bit values
    assert np.array_equal(np.asarray(eight), gray_photo())


def test_float_images_by_their_finite_range():
    unit = np.array([[0.0, 0.5, 1.0, np.nan]], np.float32)
    assert np.asarray(load_image(Image.fromarray(unit), "L")).tolist() == [[0, 128, 255, 0]]
    wide = np.array([[-1.0, 0.0, 3.0, np.inf, -np.inf, np.nan]], np.float32)  # range -1..3; inf is not part of it
    assert np.asarray(load_image(Image.fromarray(wide), "L")).tolist() == [[0, 64, 255, 255, 0, 0]]


def test_16_bit_conversion_makes_no_wide_copies():
    """The 8-bit copy is made a strip at a time: numpy's working memory stays near the 8-bit result's size,
    where int64 copies of the whole image took 8 bytes a pixel, several times over (about 1 GB for 6300x6300)."""
    import tracemalloc

    w, h = 3000, 2000
    image = Image.fromarray(np.random.default_rng(0).integers(0, 65536, (h, w), dtype=np.uint16))
    tracemalloc.start()
    try:
        load_image(image, "L")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < w * h + 32 * 2**20, f"{peak / 2**20:.0f} MB of working memory for a {w * h / 1e6:.0f}-megapixel image"


def test_decoded_bytes_follows_its_formula(tmp_path):
    """Pillow keeps RGB in 4 bytes a pixel, 16-bit gray in 2; each copy load_image may make is counted once."""
    from vit_demo.preprocess import _STRIP_PIXELS, decoded_bytes

    Image.new("RGB", (100, 50)).save(tmp_path / "rgb.jpg")
    Image.fromarray(np.zeros((50, 100), np.uint16)).save(tmp_path / "gray16.png")
    Image.new("RGBA", (100, 50)).save(tmp_path / "rgba.png")
    p = 100 * 50
    with Image.open(tmp_path / "rgb.jpg") as im:
        assert decoded_bytes(im) == 2 * p * 4  # decoded, and turned upright
        assert decoded_bytes(im, "L") == 2 * p * 4 + p
        assert decoded_bytes(im, "RGB", backend="tensor") == 2 * p * 4 + 2 * p * 3
    with Image.open(tmp_path / "gray16.png") as im:
        assert im.mode == "I;16"
        assert decoded_bytes(im) == 2 * p * 2 + p + _STRIP_PIXELS * 10 + p * 4
    with Image.open(tmp_path / "rgba.png") as im:
        assert decoded_bytes(im) == 2 * p * 4 + 2 * p * 4


def test_decoded_bytes_reads_the_header_only(tmp_path):
    """A PNG cut short after its header: its size is estimated without decoding (which would fail)."""
    from vit_demo.preprocess import decoded_bytes

    Image.fromarray(np.random.default_rng(0).integers(0, 65536, (400, 600), dtype=np.uint16)).save(tmp_path / "full.png")
    (tmp_path / "cut.png").write_bytes((tmp_path / "full.png").read_bytes()[:200])
    with Image.open(tmp_path / "cut.png") as im:
        assert decoded_bytes(im) > 600 * 400 * 2
    with Image.open(tmp_path / "cut.png") as im, pytest.raises(OSError):  # the control: decoding fails
        im.load()


# --- damaged metadata -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["PNG", "WEBP"])
def test_garbage_exif_keeps_the_pixels_unrotated(fmt):
    import io

    photo = Image.open(EXAMPLES / "chelsea.jpg").convert("RGB").resize((64, 40))
    data = with_garbage_exif(photo, fmt)
    with pytest.raises(SyntaxError):  # the control: Pillow cannot parse this EXIF block
        Image.open(io.BytesIO(data)).getexif()
    got = load_image(Image.open(io.BytesIO(data)))
    assert got.size == (64, 40) and np.array_equal(np.asarray(got), np.asarray(photo))

"""What strangers can send: unusual and broken images, bad checkpoints, names of models that are not on offer.

The app is launched for real on loopback (as in test_app.py) and called with gradio_client. Every valid but
unusual image must be classified as the reference does: Pillow's own conversion to RGB (with transparency put
on white, EXIF orientation applied, 16 bits scaled by hand), torchvision's Resize and CenterCrop with the
checkpoint's own settings, and transformers' model, which vit_demo's weights came from; every broken one
must give the visitor a readable sentence (never Gradio's generic "an exception was raised", never a traceback),
within seconds, and the next request must be answered as usual. Every Hub request goes to a server on
127.0.0.1 that this module starts itself, or to a port nothing listens on.
"""

from __future__ import annotations

import io
import json
import re
import os
import pickle
import shutil
import struct
import threading
import time
import zlib
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from huggingface_hub import constants
from PIL import Image, ImageOps

from conftest import (EXAMPLES, LABELS, confidences, free_port, hold_first_pass, launched, make_fruit_reference,
                      make_timm, make_transformers, wait_until, with_garbage_exif)
from vit_demo.registry import Registry
from vit_demo.runtime import MAX_BATCH

CHELSEA = EXAMPLES / "chelsea.jpg"
REQUEST_SECONDS = 30  # generous: the point is that nothing hangs
GENERIC = "has not enabled verbose error reporting"  # gradio_client's text for an exception that is not a gr.Error
NOT_AN_IMAGE = "This file is not an image: upload a JPEG, PNG, WebP, BMP, GIF or TIFF photo."  # refused at the upload
DAMAGED = "This file could not be read as an image (it may be truncated or damaged): try another file."
TOO_LARGE = "This image has more than 40 megapixels: scale it down and try again."



class CodePayload:
    """Unpickling this calls open(marker, "w"): the file appears if and only if the pickle's code ran."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


# --- the images -----------------------------------------------------------------------------------------------


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose IHDR (with a valid CRC) claims width x height RGB pixels, followed by a tiny IDAT."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def make_images(out: Path) -> dict[str, Path]:
    """Every valid but unusual image of the issue, plus the references some of them are compared with."""
    photo = Image.open(CHELSEA).convert("RGB")  # 451 x 300
    p = {}

    def save(name, image, **kw):
        p[name] = out / name
        image.save(p[name], **kw)

    save("rgb-1x1.png", Image.new("RGB", (1, 1), (200, 30, 60)))
    save("wide-4000x3.png", photo.resize((4000, 3), Image.BILINEAR))
    save("tall-3x4000.png", photo.resize((3, 4000), Image.BILINEAR))
    # 16 bits with real 16-bit values: the low byte is not zero and the high byte spans the range.
    gray = np.asarray(photo.convert("L"), dtype=np.uint16)
    noise = np.random.default_rng(0).integers(0, 256, gray.shape, dtype=np.uint16)
    save("gray16.png", Image.fromarray(gray * 256 + noise))
    save("cmyk.jpg", photo.convert("CMYK"), quality=95)
    pal = photo.convert("P", palette=Image.ADAPTIVE, colors=64)
    pal.info["transparency"] = 0
    save("palette-transparent.png", pal, transparency=0)
    rgba = photo.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(photo.size))
    save("rgba.png", rgba)
    save("gray.jpg", photo.convert("L"), quality=95)
    # An animated GIF of three frames in different colours (few colours each, so the palette is exact).
    colours = [(220, 20, 60), (30, 144, 255), (50, 205, 50), (255, 215, 0), (20, 20, 20), (240, 240, 240)]
    frames = []
    for f in range(3):
        a = np.zeros((96, 96, 3), np.uint8)
        for i in range(4):
            for j in range(4):
                a[24 * i: 24 * i + 24, 24 * j: 24 * j + 24] = colours[(i + 2 * j + 3 * f) % len(colours)]
        frames.append(Image.fromarray(a))
    save("animated.gif", frames[0], save_all=True, append_images=frames[1:], duration=200, loop=0)
    with Image.open(p["animated.gif"]) as gif:
        assert getattr(gif, "n_frames", 1) == 3
        save("gif-frame1.png", gif.convert("RGB"))
        gif.seek(1)
        save("gif-frame2.png", gif.convert("RGB"))
    # EXIF orientation 6: stored turned a quarter to the left, to be shown turned a quarter to the right.
    exif = Image.Exif()
    exif[0x0112] = 6
    save("exif-rotated.jpg", photo.transpose(Image.Transpose.ROTATE_90), exif=exif.tobytes(), quality=95)
    with Image.open(p["exif-rotated.jpg"]) as im:
        save("exif-upright.png", ImageOps.exif_transpose(im))  # the same pixels, upright, without EXIF
        save("exif-ignored.png", Image.fromarray(np.asarray(im)))  # the same pixels as stored, EXIF dropped
    save("photo.webp", photo, quality=90)
    for fmt, name in (("PNG", "garbage-exif.png"), ("WEBP", "garbage-exif.webp")):  # EXIF Pillow cannot parse
        p[name] = out / name
        p[name].write_bytes(with_garbage_exif(photo, fmt))
    save("photo.bmp", photo)
    save("photo.tiff", photo)
    save("large-6000x4000.jpg", photo.resize((6000, 4000), Image.BICUBIC), quality=90)
    return p


VALID = [
    "rgb-1x1.png", "wide-4000x3.png", "tall-3x4000.png", "gray16.png", "cmyk.jpg", "palette-transparent.png",
    "rgba.png", "gray.jpg", "animated.gif", "exif-rotated.jpg", "photo.webp", "photo.bmp", "photo.tiff",
    "large-6000x4000.jpg", "garbage-exif.png", "garbage-exif.webp",
]
EXPLAINED = {"rgb-1x1.png", "tall-3x4000.png", "gray16.png", "cmyk.jpg", "animated.gif", "large-6000x4000.jpg"}


def make_broken(out: Path) -> dict[str, Path]:
    p = {}

    def write(name, data: bytes):
        p[name] = out / name
        p[name].write_bytes(data)

    write("empty.jpg", b"")
    write("text.jpg", b"this is text, not a JPEG\n" * 40)
    jpeg = (EXAMPLES / "astronaut.jpg").read_bytes()
    write("truncated.jpg", jpeg[: len(jpeg) // 2])
    write("claims-100000x100000.png", png_claiming(100_000, 100_000))  # 10 gigapixels: an error from the header
    write("claims-9000x5000.png", png_claiming(9000, 5000))  # 45 megapixels: over the cap, under Pillow's error
    write("drawing.svg", b'<svg xmlns="http://www.w3.org/2000/svg" width="64" height="64">'
                         b'<circle cx="32" cy="32" r="30" fill="red"/></svg>\n')
    return p


# --- the app --------------------------------------------------------------------------------------------------


class App:
    """What the module's tests share: the client, the demo, the checkpoints and the reference model."""


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    from gradio_client import Client
    from safetensors.torch import load_file, save_file
    from transformers import ResNetConfig, ResNetForImageClassification

    tmp = tmp_path_factory.mktemp("inputs")
    a = App()
    a.tmp = tmp
    a.fruit = make_fruit_reference(tmp / "good")
    good = a.fruit.path
    # Checkpoints that must each give a message and leave the app as it was.
    corrupt = make_transformers(tmp / "corrupt", "small").path
    data = (corrupt / "model.safetensors").read_bytes()
    (corrupt / "model.safetensors").write_bytes(data[: len(data) // 2])
    shapes = make_timm(tmp / "shapes", "vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2).path
    sd = load_file(str(shapes / "model.safetensors"))
    sd["blocks.1.mlp.fc1.weight"] = torch.zeros(100, 192)
    save_file(sd, str(shapes / "model.safetensors"))
    # No config.json: 96 wide with 4 heads, so the 12 heads guessed without a config divide the width too.
    no_config = make_transformers(tmp / "no-config", "small", hidden_size=96, num_attention_heads=4, num_labels=3).path
    (no_config / "config.json").unlink()
    resnet = tmp / "resnet"
    ResNetForImageClassification(ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=3)).save_pretrained(resnet)
    a.marker = tmp / "pickle-code-ran"
    evil = tmp / "evil" / "vit_b_16.pth"
    evil.parent.mkdir()
    torch.save({"class_token": CodePayload(str(a.marker))}, evil)
    # A model whose preprocessing resizes the shorter side (timm's recipe), and three more to fill the cache.
    timm_vit = make_timm(tmp / "timm", "vit_tiny_patch16_224", depth=2).path
    # A grayscale model that pads photos to a square on a dark ground, as the bundled Fashion-MNIST one does.
    dark = make_transformers(tmp / "dark", "small", image_size=28, patch_size=7, num_channels=1, num_labels=10).path
    pp_path = dark / "preprocessor_config.json"
    pp_path.write_text(json.dumps({**json.loads(pp_path.read_text()), "do_dark_background": True}))
    extra = [str(make_transformers(tmp / f"extra{i}", "small").path) for i in range(3)]
    a.bad = {
        "corrupt safetensors": (str(corrupt), "model.safetensors is not a readable safetensors file (it may be truncated): download it again."),
        "mismatched shapes": (str(shapes), "do not fit together as a ViT"),
        "not a ViT (ResNet)": (str(resnet), "is a 'resnet' model, not a ViT"),
        "pickle carrying code": (str(evil), "vit_b_16.pth contains more than tensors (objects or code) and was refused: use a safetensors file."),
        "missing repo": ("someone/no-such-vit", "No model someone/no-such-vit was found on the Hugging Face Hub"),
        "gated repo": ("someone/gated-vit", "someone/gated-vit is a gated model: accept its terms on its Hub page"),
        "unreachable Hub": ("google/vit-base-patch16-224", "The Hugging Face Hub could not be reached to download google/vit-base-patch16-224"),
    }
    a.good, a.no_config, a.timm, a.dark, a.extra = str(good), str(no_config), str(timm_vit), str(dark), extra
    choices = [a.good] + [src for src, _ in a.bad.values()] + [a.no_config, a.timm, a.dark] + extra
    # These tests load many models from one machine, each from its own gradio_client session: neither the switch
    # limit per visitor nor the rule that keeps other visitors' models loaded is what they look at (test_crowd is).
    registry = Registry(choices, default=a.good, device="cpu")
    registry.busy_seconds = 0
    with pytest.MonkeyPatch.context() as mp, launched(registry, tmp) as (a.demo, a.url):
        mp.setenv("VIT_DEMO_SWITCHES_PER_MINUTE", "1000")
        a.client = Client(a.url, download_files=False, verbose=False)
        (tmp / "images").mkdir()
        a.images = make_images(tmp / "images")
        (tmp / "broken").mkdir()
        a.broken = make_broken(tmp / "broken")
        try:
            yield a
        finally:
            a.client.close()


def reference_rgb(image: Image.Image) -> Image.Image:
    """The photo as the reference sees it: Pillow's conversion to RGB, after the conventions any viewer applies
    (EXIF orientation, transparency on white, 16 bits to 8 by hand)."""
    try:
        image = ImageOps.exif_transpose(image)
    except SyntaxError:  # an EXIF block Pillow cannot parse: the pixels as stored
        pass
    if image.mode.startswith("I;16"):
        return Image.fromarray(np.round(np.asarray(image) * (255 / 65535)).astype(np.uint8)).convert("RGB")
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba).convert("RGB")
    return image.convert("RGB")


def reference_answer(app, image: Image.Image, k: int = 5) -> list[tuple[str, float]]:
    """Top-k of the transformers model on torchvision's Resize (+ CenterCrop) of `reference_rgb(image)`, with the
    settings of the checkpoint's preprocessor_config.json."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import v2 as T

    pp = json.loads((app.fruit.path / "preprocessor_config.json").read_text())
    assert pp["resample"] == 2  # bilinear
    x = T.PILToTensor()(reference_rgb(image))  # uint8 (3, H, W), resized as a tensor as transformers does
    x = T.Resize((pp["size"]["height"], pp["size"]["width"]), InterpolationMode.BILINEAR, antialias=True)(x)
    if pp.get("do_center_crop"):
        x = T.CenterCrop((pp["crop_size"]["height"], pp["crop_size"]["width"]))(x)
    mean, std = torch.tensor(pp["image_mean"]).view(3, 1, 1), torch.tensor(pp["image_std"]).view(3, 1, 1)
    with torch.no_grad():
        probs = app.fruit.forward(((x.float() / 255 - mean) / std).unsqueeze(0))[0].softmax(-1)
    values, indices = probs.topk(k)
    return [(LABELS[i], float(p)) for p, i in zip(values.tolist(), indices.tolist())]


def reference_for(app, path) -> list[tuple[str, float]]:
    with Image.open(path) as im:
        return reference_answer(app, im)


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    elapsed = time.perf_counter() - start
    assert elapsed < REQUEST_SECONDS, f"the request took {elapsed:.1f} s"
    return result, elapsed


def classify(app, path, **kwargs) -> list[tuple[str, float]]:
    from gradio_client import handle_file

    result, _ = timed(app.client.predict, image=handle_file(str(path)), api_name="/classify", **kwargs)
    return confidences(result)


def refusal(app, path, api_name="/classify", **kwargs) -> tuple[str, float]:
    """The message of the error the app answers with, and how long the answer took."""
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    start = time.perf_counter()
    with pytest.raises((AppError, httpx.HTTPStatusError)) as info:  # the event's error, or the upload's (415)
        app.client.predict(image=handle_file(str(path)), api_name=api_name, **kwargs)
    elapsed = time.perf_counter() - start
    assert elapsed < REQUEST_SECONDS, f"the refusal took {elapsed:.1f} s"
    if isinstance(info.value, httpx.HTTPStatusError):
        assert info.value.response.status_code == 415, info.value
        message = info.value.response.text
    else:
        message = str(info.value)
    assert message.strip(), "an empty message"
    assert "Traceback" not in message and GENERIC not in message, message
    return message, elapsed


def assert_same(got, expected, what=""):
    assert [label for label, _ in got] == [label for label, _ in expected], f"{what}: {got} != {expected}"
    diff = max(abs(p - q) for (_, p), (_, q) in zip(got, expected))
    assert diff <= 1e-4, f"{what}: probabilities differ by {diff:.3g}"


def assert_differs(other, got, what: str):
    """The control for a sameness test: `other` (what a wrong answer would be) must not look like `got`."""
    assert [l for l, _ in other] != [l for l, _ in got] or max(abs(p - q) for (_, p), (_, q) in zip(other, got)) > 1e-3, \
        f"{what} should not look alike to the model, or this test proves nothing"


def still_serving(app):
    """A valid request right after is answered, by the model the app had."""
    got = classify(app, CHELSEA)
    assert_same(got, reference_for(app, CHELSEA), "chelsea after a refusal")
    assert app.good in app.demo.registry.loaded()


# --- valid but unusual images ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", VALID)
def test_unusual_image_is_classified_as_the_reference_does(app, name):
    path = app.images[name]
    got = classify(app, path)
    assert len(got) == 5 and set(label for label, _ in got) <= set(LABELS)
    assert_same(got, reference_for(app, path), name)
    if name in EXPLAINED:
        from gradio_client import handle_file

        result, _ = timed(app.client.predict, image=handle_file(str(path)), method="rollout", api_name="/explain")
        assert isinstance(result, dict) and result.get("url"), result
        response = httpx.get(result["url"], timeout=REQUEST_SECONDS)
        response.raise_for_status()
        overlay = Image.open(io.BytesIO(response.content))
        assert overlay.mode == "RGB" and overlay.size == (224, 224)


def test_animated_gif_is_classified_by_its_first_frame(app):
    got = classify(app, app.images["animated.gif"])
    assert_same(got, classify(app, app.images["gif-frame1.png"]), "GIF vs its first frame")
    assert_differs(reference_for(app, app.images["gif-frame2.png"]), got, "the two frames")


def test_exif_rotated_photo_is_put_upright_before_classifying(app):
    got = classify(app, app.images["exif-rotated.jpg"])
    assert_same(got, classify(app, app.images["exif-upright.png"]), "EXIF-rotated vs upright")
    assert_differs(reference_for(app, app.images["exif-ignored.png"]), got, "upright and sideways")


def test_16_bit_image_keeps_its_contrast(app):
    """Real 16-bit values are scaled to 8 bits, not clipped to white."""
    with Image.open(app.images["gray16.png"]) as im:
        assert im.mode.startswith("I") and np.asarray(im).max() > 255
        crop = app.demo.registry.get(app.good).preprocessor.crop(im)
    with Image.open(CHELSEA) as im:
        eight_bit = app.demo.registry.get(app.good).preprocessor.crop(im.convert("L"))
    assert len(torch.unique(crop)) > 100
    assert (crop.float() - eight_bit.float()).abs().mean() < 3  # the high byte is the 8-bit photo


def test_the_largest_photo_allowed_is_classified_and_one_row_more_is_refused(app):
    """40 megapixels (8000x5000) is the cap: a photo of exactly that size is classified as the reference does, and
    one a row taller is refused from its header."""
    photo = Image.open(CHELSEA).convert("RGB")
    at_cap, over = app.tmp / "images" / "8000x5000.jpg", app.tmp / "images" / "8000x5001.jpg"
    photo.resize((8000, 5000), Image.BILINEAR).save(at_cap, quality=85)
    photo.resize((8000, 5001), Image.BILINEAR).save(over, quality=85)
    assert at_cap.stat().st_size < 20 * 2**20 and over.stat().st_size < 20 * 2**20  # under the upload cap
    assert_same(classify(app, at_cap), reference_for(app, at_cap), "8000x5000")
    message, _ = refusal(app, over)
    assert TOO_LARGE in message


@pytest.mark.parametrize("model, name", [
    pytest.param("timm", "tall-3x4000.png", id="timm-shorter-side-resize-3x4000"),
    pytest.param("dark", "needle-1x10000.png", id="dark-ground-square-1x10000"),
])
def test_elongated_image_stays_small_in_memory(app, monkeypatch, model, name):
    """A thin image is classified without making an intermediate image thousands of times its size."""
    path = app.images.get(name)
    if path is None:  # a 1-pixel-wide strip: light, with one dark pixel
        path = app.tmp / "images" / name
        strip = Image.new("RGB", (1, 10_000), (240, 240, 240))
        strip.putpixel((0, 5000), (0, 0, 0))
        strip.save(path)
    seen = []
    resize, new = Image.Image.resize, Image.new

    def spy_resize(self, size, *args, **kwargs):
        seen.append(size[0] * size[1])
        return resize(self, size, *args, **kwargs)

    def spy_new(mode, size, *args, **kwargs):
        seen.append(size[0] * size[1])
        return new(mode, size, *args, **kwargs)

    from vit_demo import decode

    source = getattr(app, model)
    got = classify(app, path, model=source)  # decoded in a worker process
    clf = app.demo.registry.get(source)
    # What that worker ran, run here under the spies: every image it makes is seen.
    monkeypatch.setattr(Image.Image, "resize", spy_resize)
    monkeypatch.setattr(Image, "new", spy_new)
    crop = decode.read_crop(str(path), clf.preprocessor.cfg)
    monkeypatch.undo()
    assert seen, "the spies saw no image being made"
    with Image.open(path) as im:
        assert_same(got, clf.predict(im, k=5), f"{model} model, {name}")
        assert np.array_equal(crop, clf.preprocessor.crop(im).numpy())
    biggest = max(seen)
    print(f"\n{name}: largest intermediate image {biggest} pixels")
    assert biggest <= 16_000_000, f"an intermediate image of {biggest / 1e6:.0f} megapixels for a {name}"


# --- broken images --------------------------------------------------------------------------------------------


BROKEN = [
    ("empty.jpg", NOT_AN_IMAGE),
    ("text.jpg", NOT_AN_IMAGE),
    ("truncated.jpg", DAMAGED),
    ("claims-100000x100000.png", TOO_LARGE),
    ("claims-9000x5000.png", TOO_LARGE),
    ("drawing.svg", NOT_AN_IMAGE),
]


@pytest.mark.parametrize("name, expected", BROKEN, ids=[name for name, _ in BROKEN])
@pytest.mark.parametrize("api_name", ["/classify", "/explain"])
def test_broken_image_gets_a_readable_message(app, name, expected, api_name):
    message, elapsed = refusal(app, app.broken[name], api_name=api_name)
    print(f"\n{name} {api_name}: {message!r} ({elapsed:.2f} s)")
    assert expected in message
    if "claims" in name:
        assert elapsed < 10, f"refused after {elapsed:.1f} s: it should be refused from the header, before decoding"
    still_serving(app)


def test_svg_is_told_which_formats_are_read(app):
    message, _ = refusal(app, app.broken["drawing.svg"])
    assert "JPEG, PNG" in message


def test_upload_over_the_size_cap_is_refused(app):
    """gradio_client refuses to send it; sent anyway (as a page or a script would), the server refuses the upload
    (HTTP 413) before reading its body."""
    from gradio_client import handle_file

    big = app.tmp / "broken" / "too-big.png"
    big.write_bytes(os.urandom(21 * 1024 * 1024))
    start = time.perf_counter()
    with pytest.raises(ValueError) as info:
        app.client.predict(image=handle_file(str(big)), api_name="/classify")
    message = str(info.value)
    print(f"\ntoo-big.png (21 MiB), gradio_client: {type(info.value).__name__}: {message!r} ({time.perf_counter() - start:.2f} s)")
    assert "exceeds the maximum file size of 20971520 bytes" in message
    assert app.demo.max_file_size == 20 * 1024 * 1024
    start = time.perf_counter()
    with open(big, "rb") as f:
        response = httpx.post(f"{app.url.rstrip('/')}/gradio_api/upload", files={"files": ("too-big.png", f)}, timeout=REQUEST_SECONDS)
    elapsed = time.perf_counter() - start
    print(f"too-big.png (21 MiB), server: HTTP {response.status_code} {response.text!r} ({elapsed:.2f} s)")
    assert elapsed < REQUEST_SECONDS
    assert response.status_code == 413
    assert response.text == "The request is larger than 21 MB: send a smaller file."  # from its declared length
    still_serving(app)


# --- bad checkpoints, through the app -------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["corrupt safetensors", "mismatched shapes", "not a ViT (ResNet)", "pickle carrying code", "missing repo", "gated repo", "unreachable Hub"])
def test_bad_checkpoint_gets_a_message_and_the_app_keeps_its_model(app, fake_hub, monkeypatch, case):
    source, expected = app.bad[case]
    if case == "unreachable Hub":
        monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    classify(app, CHELSEA)  # the good model is loaded
    before = app.demo.registry.get(app.good)
    message, elapsed = refusal(app, CHELSEA, model=source)
    print(f"\n{case}: {message!r} ({elapsed:.2f} s)")
    assert expected in message
    if case == "unreachable Hub":
        assert elapsed < 10, f"{elapsed:.1f} s: huggingface_hub's retries were not avoided"
    message_explain, _ = refusal(app, CHELSEA, api_name="/explain", model=source)
    assert expected in message_explain
    assert source not in app.demo.registry.loaded()
    assert not app.marker.exists(), "the pickle's code was executed"
    still_serving(app)
    assert app.demo.registry.get(app.good) is before  # the same model, not loaded again


def test_the_code_payload_would_run_if_unpickled(app, tmp_path):
    """The positive control for the test above: the same payload, loaded without weights_only, does run."""
    marker = tmp_path / "ran"
    path = tmp_path / "control.pth"
    with open(path, "wb") as f:
        pickle.dump({"class_token": CodePayload(str(marker))}, f)
    with open(path, "rb") as f:
        pickle.load(f)  # unrestricted unpickling, as weights_only=False allows
    assert marker.exists()


def test_missing_config_gets_a_message(app, fake_hub):
    from gradio_client.exceptions import AppError

    try:
        got = classify(app, CHELSEA, model=app.no_config)
    except AppError as e:
        message = str(e)
    else:
        pytest.fail(f"answered {got} (12 guessed heads, made-up labels) instead of saying that config.json is missing")
    assert "config.json" in message and "Traceback" not in message
    still_serving(app)


# --- untrusted visitors ---------------------------------------------------------------------------------------


UNTRUSTED = ["/etc/passwd", "../x", "someone/repo", "~/.cache/huggingface", "./tests", "a/b/c", "google/vit-large-patch16-224"]


@pytest.mark.parametrize("name", UNTRUSTED + ["<a local copy of the served checkpoint>"])
def test_models_not_on_offer_are_refused(app, fake_hub, name):
    if name.startswith("<"):
        name = str(app.tmp / "copy-of-good")
        if not Path(name).exists():
            shutil.copytree(app.good, name)
    assert app.demo.registry.allow_any is False
    message, _ = refusal(app, CHELSEA, model=name)
    assert f"'{name}' is not one of the models this app offers: pick one from the list." in message
    message, _ = refusal(app, CHELSEA, api_name="/explain", model=name)
    assert "is not one of the models" in message
    assert fake_hub == [], "the Hub was asked"
    assert name not in app.demo.registry.loaded()
    still_serving(app)


@pytest.mark.parametrize("name", ["/etc/passwd", "../x", "./tests", "~/.cache/huggingface", "a/b/c", "a/../b", "<a local copy of the served checkpoint>"])
def test_allow_any_model_still_refuses_local_paths(app, fake_hub, monkeypatch, name):
    if name.startswith("<"):
        name = str(app.tmp / "copy-of-good")
        if not Path(name).exists():
            shutil.copytree(app.good, name)
    monkeypatch.setattr(app.demo.registry, "allow_any", True)
    message, _ = refusal(app, CHELSEA, model=name)
    assert f"'{name}' is not one of the models this app offers" in message
    assert fake_hub == []
    assert name not in app.demo.registry.loaded()


def test_allow_any_model_lets_hub_ids_through(app, fake_hub, monkeypatch):
    """With VIT_DEMO_ALLOW_ANY_MODEL=1 a Hub id is looked up (here on the loopback Hub, which has none)."""
    monkeypatch.setattr(app.demo.registry, "allow_any", True)
    message, _ = refusal(app, CHELSEA, model="someone/repo")
    assert "No model someone/repo was found on the Hugging Face Hub" in message
    assert fake_hub, "the Hub was not asked"
    assert all(p.startswith(("/api/models/someone/repo", "/someone/repo")) for p in fake_hub), fake_hub


def test_loaded_models_are_bounded(app):
    reg = app.demo.registry
    assert isinstance(reg.capacity, int) and 1 <= reg.capacity <= 3
    for name in app.extra + [app.good]:
        got = classify(app, CHELSEA, model=name)
        assert len(got) == 5
        assert len(reg.loaded()) <= reg.capacity
    assert reg.loaded()[-1] == app.good


# --- the queue ------------------------------------------------------------------------------------------------


def test_queue_is_bounded(app):
    """Every lane's waiting room is bounded (fair.Policy): cheap and page events 64, heavy ones VIT_DEMO_HEAVY_WAIT."""
    queue = app.demo._queue
    assert (queue.policy.cheap_wait, queue.policy.page_wait, queue.policy.heavy_wait) == (64, 64, 4)
    assert queue.limit_of("cheap") == MAX_BATCH
    assert app.demo.max_file_size == 20 * 1024 * 1024  # LAUNCH_KWARGS' "20mb"


def test_a_full_queue_tells_the_visitor_to_retry(app, monkeypatch):
    """With the cheap lane's waiting room shrunk to 2 and the model held up: MAX_BATCH requests run (/classify's
    workers), 2 wait, the next are told how many are ahead and when to retry; once the model is let go, the held
    and waiting requests are answered as usual. The visitor's own share is raised so that the lane is what fills."""
    import dataclasses

    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    clf = app.demo.registry.get(app.good)
    queue = app.demo._queue
    release = threading.Event()
    running = []
    predict = clf.predict

    def held(*args, **kwargs):
        running.append(1)
        release.wait(timeout=REQUEST_SECONDS)
        return predict(*args, **kwargs)

    monkeypatch.setattr(clf, "predict", held)
    monkeypatch.setattr(queue, "policy", dataclasses.replace(
        queue.policy, cheap_wait=2, session_jobs=(("cheap", 64), ("heavy", 2), ("page", 8)),
        address_jobs=(("cheap", 64), ("heavy", 4), ("page", 64))))
    submit = lambda: app.client.submit(image=handle_file(str(CHELSEA)), api_name="/classify")  # noqa: E731
    try:
        # Fill the workers first, one at a time, then the waiting room.
        admitted, deadline = [], time.monotonic() + REQUEST_SECONDS
        for i in range(MAX_BATCH):
            admitted.append(submit())
            while len(running) <= i and time.monotonic() < deadline:
                time.sleep(0.02)
        admitted += [submit() for _ in range(2)]
        while len(queue) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(running) == MAX_BATCH and len(queue) == 2, (len(running), len(queue))
        for job in [submit() for _ in range(3)]:
            with pytest.raises(AppError) as info:
                job.result(timeout=REQUEST_SECONDS)
            print(f"\nfull lane: {info.value}")
            assert re.fullmatch(rf"busy: {MAX_BATCH + 2} requests ahead, try again in about \d+ s\.", str(info.value))
    finally:
        release.set()
    expected = reference_for(app, CHELSEA)
    for job in admitted:
        assert_same(confidences(job.result(timeout=2 * REQUEST_SECONDS)), expected, "a request that waited")
    monkeypatch.undo()
    still_serving(app)


def test_concurrent_visitors_share_forward_passes_and_a_damaged_file_fails_alone(app, monkeypatch):
    """Ten visitors at once (ten sessions), one with a truncated JPEG: their passes are batched (runtime.Batcher),
    the damaged file gets its message, and every other visitor gets the answer a lone request gets."""
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    batcher = app.demo.registry.get(app.good).runtime.batcher
    monkeypatch.setattr(batcher, "forward", batcher.forward)  # restored at the end
    # Nine photos the app has not seen (answers are kept per photo): the examples, each with one pixel changed.
    photos = []
    for i, name in enumerate(("chelsea.jpg", "astronaut.jpg", "coffee.jpg") * 3):
        image = Image.open(EXAMPLES / name).convert("RGB")
        image.putpixel((0, 0), (i, 255 - i, 7 * i))
        image.save(app.tmp / "images" / f"batched-{i}.png")
        photos.append(app.tmp / "images" / f"batched-{i}.png")
    files = photos[:1] + photos[1:4] + [app.broken["truncated.jpg"]] + photos[4:]
    visitors = [Client(app.url, download_files=False, verbose=False) for _ in files]
    try:
        seen = hold_first_pass(batcher, len(photos) - 1)  # the first visitor's pass waits for the other eight
        jobs = [visitors[0].submit(image=handle_file(str(files[0])), api_name="/classify")]
        wait_until(lambda: seen)
        jobs += [v.submit(image=handle_file(str(f)), api_name="/classify") for v, f in zip(visitors[1:], files[1:])]
        for f, job in zip(files, jobs):
            if f.name == "truncated.jpg":
                with pytest.raises(AppError) as info:
                    job.result(timeout=REQUEST_SECONDS)
                assert str(info.value) == DAMAGED
            else:
                assert_same(confidences(job.result(timeout=REQUEST_SECONDS)), reference_for(app, f), f.name)
        assert seen == [1, len(photos) - 1], seen
    finally:
        for v in visitors:
            v.close()
    monkeypatch.undo()
    still_serving(app)

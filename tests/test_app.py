"""The Gradio app, launched for real on loopback and called with gradio_client; and the model Registry.

One small random-weight transformers ViT (224 px, 32 px patches: a 7x7 grid, 4 heads, 2 layers, 7 named
classes) is served for the whole module. Gradio's and the client's temporary files go to a folder of the
test's own, and the client does not download results (download_files=False): images are fetched by URL.
"""

import io
import json
import logging
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from conftest import EXAMPLES, LABELS, confidences, launched, lay_out_hub_cache, make_fruit_checkpoint, make_transformers
from vit_demo import ModelLoadError, load_classifier
from vit_demo.registry import BUNDLED_NAME, CURATED, DEFAULT_MODEL, Registry, bundled_available

CHELSEA = str(EXAMPLES / "chelsea.jpg")



@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(client, checkpoint path, demo): the app serving one small checkpoint, closed at the end."""
    from gradio_client import Client

    tmp = tmp_path_factory.mktemp("app")
    path = make_fruit_checkpoint(tmp / "ckpt")
    with launched(Registry([str(path)], default=str(path), device="cpu"), tmp) as (demo, url):
        client = Client(url, download_files=False, verbose=False)
        try:
            yield client, path, demo
        finally:
            client.close()


@pytest.fixture(scope="module")
def reference_classifier(served):
    return load_classifier(served[1], device="cpu")


def block(demo, elem_id: str):
    """The one component of `demo` with this elem_id."""
    found = [b for b in demo.blocks.values() if getattr(b, "elem_id", None) == elem_id]
    assert len(found) == 1, f"{len(found)} components with id {elem_id!r}"
    return found[0]


def fetch_image(result) -> Image.Image:
    """An image output of the client (a FileData dict, as download_files=False gives it), fetched by its URL."""
    assert isinstance(result, dict) and result.get("url"), result
    response = httpx.get(result["url"], timeout=30)
    response.raise_for_status()
    image = Image.open(io.BytesIO(response.content))
    image.load()
    return image


# --- /classify ------------------------------------------------------------------------------------------------


def test_classify_with_only_the_image(served, reference_classifier):
    from gradio_client import handle_file

    client, _, _ = served
    result = client.predict(image=handle_file(CHELSEA), api_name="/classify")
    got = confidences(result)
    assert len(got) == 5  # the default top_k
    labels = [label for label, _ in got]
    assert set(labels) <= set(LABELS) and len(set(labels)) == 5
    assert result["label"] == labels[0]
    expected = reference_classifier.predict(Image.open(CHELSEA), k=5)
    assert labels == [label for label, _ in expected]
    for (_, p), (_, q) in zip(got, expected):
        assert abs(p - q) <= 1e-5


def test_classify_top_k(served, reference_classifier):
    from gradio_client import handle_file

    client, _, _ = served
    got = confidences(client.predict(image=handle_file(CHELSEA), top_k=3, api_name="/classify"))
    assert len(got) == 3
    scores = [p for _, p in got]
    assert scores == sorted(scores, reverse=True)
    assert all(0 <= p <= 1 for p in scores)
    assert sum(scores) <= 1 + 1e-6
    expected = reference_classifier.predict(Image.open(CHELSEA), k=3)
    assert [label for label, _ in got] == [label for label, _ in expected]
    assert max(abs(p - q) for (_, p), (_, q) in zip(got, expected)) <= 1e-5
    # Asking for more classes than the model has gives all of them, summing to 1.
    every = confidences(client.predict(image=handle_file(CHELSEA), top_k=20, api_name="/classify"))
    assert sorted(label for label, _ in every) == sorted(LABELS)
    assert abs(sum(p for _, p in every) - 1) <= 1e-5


# --- /explain -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["rollout", "attention", "heads"])
def test_explain_with_only_image_and_method(served, method):
    from gradio_client import handle_file

    client, _, _ = served
    image = fetch_image(client.predict(image=handle_file(CHELSEA), method=method, api_name="/explain"))
    assert image.mode == "RGB"
    if method == "heads":
        # 4 heads of one layer: a 2x2 sheet of 224x224 panels with 4-pixel gaps.
        assert image.size == (2 * 224 + 4, 2 * 224 + 4)
    else:
        assert image.size == (224, 224)  # the crop the model saw


def test_explain_matches_the_python_api(served, reference_classifier):
    """The endpoint's defaults (last layer, mean of heads, mean fusion, discard 0.9, alpha 0.6) are the
    Python API's with discard_ratio=0.9; and alpha=0 gives back exactly the crop the model saw."""
    from gradio_client import handle_file

    client, _, _ = served
    photo = Image.open(CHELSEA)
    served_rollout = np.asarray(fetch_image(client.predict(image=handle_file(CHELSEA), method="rollout", api_name="/explain")), dtype=int)
    local = np.asarray(reference_classifier.explain(photo, "rollout", discard_ratio=0.9), dtype=int)
    assert np.abs(served_rollout - local).max() <= 1
    bare = fetch_image(client.predict(image=handle_file(CHELSEA), method="attention", alpha=0, api_name="/explain"))
    crop = reference_classifier.preprocessor.crop(photo).permute(1, 2, 0).numpy()
    assert np.array_equal(np.asarray(bare), crop)


# --- the API's description ------------------------------------------------------------------------------------


def test_view_api_lists_the_two_endpoints_with_defaults(served):
    client, path, _ = served
    api = client.view_api(return_format="dict", print_info=False)
    named = api["named_endpoints"]
    assert "/classify" in named and "/explain" in named
    params = {name: named[name]["parameters"] for name in ("/classify", "/explain")}
    assert [p["parameter_name"] for p in params["/classify"]] == ["image", "top_k", "model"]
    explain_names = [p["parameter_name"] for p in params["/explain"]]
    assert explain_names[:2] == ["image", "method"]
    assert set(explain_names) >= {"model", "layer", "head", "head_fusion", "discard_ratio", "alpha"}
    for name, ps in params.items():
        assert ps[0]["parameter_has_default"] is False, name
        for p in ps[1:]:
            assert p["parameter_has_default"] is True, (name, p["parameter_name"])
    defaults = {p["parameter_name"]: p["parameter_default"] for p in params["/explain"]}
    assert defaults["method"] == "rollout" and defaults["model"] == path.name  # a display name, not the server path
    assert {p["parameter_name"]: p["parameter_default"] for p in params["/classify"]}["top_k"] == 5
    assert [r["component"] for r in named["/classify"]["returns"]] == ["Label"]
    assert [r["component"].lower() for r in named["/explain"]["returns"]] in (["image"], ["resultimage"])
    assert [r["python_type"]["type"] for r in named["/explain"]["returns"]] == ["filepath"]
    # The page's own events are not public.
    assert not set(named) & {"/show_answer", "/show_extras", "/select_model", "/explain_live", "/new_photo",
                             "/check_photo", "/answer_photo", "/explain_photo", "/answer_top_k", "/open_tab"}
    assert str(path) not in json.dumps(api)


# --- refusals -------------------------------------------------------------------------------------------------


def test_a_file_that_is_not_an_image_is_refused_and_the_app_goes_on(served, tmp_path):
    """A file that does not start like an image is refused at the upload (415) with a sentence, and kept nowhere;
    one that does but cannot be decoded is refused by the event. Either way the next photo is answered."""
    import httpx
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    client, _, _ = served
    fake = tmp_path / "photo.jpg"
    fake.write_text("this is text, not a JPEG\n" * 20)
    for api_name in ("/classify", "/explain"):
        with pytest.raises(httpx.HTTPStatusError) as info:
            client.predict(image=handle_file(str(fake)), api_name=api_name)
        assert info.value.response.status_code == 415
        assert info.value.response.text == "This file is not an image: upload a JPEG, PNG, WebP, BMP, GIF or TIFF photo."
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0" + b"not the rest of a JPEG" * 20)
    with pytest.raises(AppError) as info:
        client.predict(image=handle_file(str(broken)), api_name="/classify")
    assert "could not be read as an image" in str(info.value)
    assert "Traceback" not in str(info.value)
    with pytest.raises(AppError, match="could not be read as an image"):
        client.predict(image=handle_file(str(broken)), method="rollout", api_name="/explain")
    # The next valid request is answered.
    assert len(confidences(client.predict(image=handle_file(CHELSEA), top_k=2, api_name="/classify"))) == 2


def test_a_model_not_on_the_list_is_refused(served):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    client, _, demo = served
    with pytest.raises(AppError) as info:
        client.predict(image=handle_file(CHELSEA), model="someone/other", api_name="/classify")
    message = str(info.value)
    assert "'someone/other' is not one of the models this app offers: pick one from the list." in message
    assert "list of choices" not in message  # Gradio's own refusal would show the (local) choices
    assert demo.registry.loaded() == [demo.registry.default]  # nothing else was loaded
    # And the app goes on.
    assert len(confidences(client.predict(image=handle_file(CHELSEA), top_k=1, api_name="/classify"))) == 1


# --- Registry (no app) ----------------------------------------------------------------------------------------


@pytest.fixture
def clean_env(monkeypatch):
    for name in ("VIT_DEMO_MODEL", "VIT_DEMO_MODELS", "VIT_DEMO_ALLOW_ANY_MODEL"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_registry_from_env_defaults(clean_env):
    reg = Registry.from_env()
    assert reg.default == DEFAULT_MODEL
    assert reg.choices == list(dict.fromkeys([DEFAULT_MODEL] + CURATED + ([BUNDLED_NAME] if bundled_available() else [])))
    assert reg.allow_any is False


def test_registry_from_env_model_and_models(clean_env):
    clean_env.setenv("VIT_DEMO_MODEL", " org/default-vit ")
    reg = Registry.from_env()
    assert reg.default == "org/default-vit"
    assert reg.choices[0] == "org/default-vit" and set(CURATED) <= set(reg.choices)

    clean_env.setenv("VIT_DEMO_MODELS", "org/a, org/b,,org/a ,")
    reg = Registry.from_env(capacity=2)
    assert reg.choices == ["org/default-vit", "org/a", "org/b"]
    assert reg.capacity == 2
    assert reg.check_allowed("org/b") == "org/b"
    assert reg.check_allowed("") == "org/default-vit"
    with pytest.raises(ModelLoadError, match="is not one of the models"):
        reg.check_allowed(CURATED[1])  # the curated list is replaced, not extended

    clean_env.delenv("VIT_DEMO_MODEL")
    assert Registry.from_env().default == DEFAULT_MODEL
    assert Registry.from_env().choices == [DEFAULT_MODEL, "org/a", "org/b"]


@pytest.mark.parametrize("flag, allowed", [("1", True), ("true", True), ("YES", True), ("on", True), ("0", False), ("", False), ("no", False)])
def test_registry_from_env_allow_any(clean_env, flag, allowed):
    clean_env.setenv("VIT_DEMO_ALLOW_ANY_MODEL", flag)
    reg = Registry.from_env()
    assert reg.allow_any is allowed
    if allowed:
        assert reg.check_allowed("someone/any-vit") == "someone/any-vit"
    else:
        with pytest.raises(ModelLoadError, match="is not one of the models"):
            reg.check_allowed("someone/any-vit")


@pytest.mark.parametrize("name", ["/etc", "/etc/passwd", "../x", "../../x/y", "./x", "~/x", "a/b/c", "x", "a/../b", "\\x/y", "examples/chelsea.jpg"])
def test_allow_any_still_refuses_local_paths(clean_env, name):
    clean_env.chdir(EXAMPLES.parent)  # so that the relative "examples/chelsea.jpg" exists
    clean_env.setenv("VIT_DEMO_ALLOW_ANY_MODEL", "1")
    reg = Registry.from_env()
    with pytest.raises(ModelLoadError, match="is not one of the models"):
        reg.check_allowed(name)
    with pytest.raises(ModelLoadError):
        reg.get(name)
    assert reg.loaded() == []


@pytest.fixture(scope="module")
def small_models(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lru")
    return [str(make_transformers(tmp / name, "small").path) for name in ("m1", "m2", "m3")]


def test_registry_lru_capacity_one(small_models):
    m1, m2, _ = small_models
    reg = Registry([m1, m2], default=m1, capacity=1, device="cpu")
    first = reg.get()
    assert reg.loaded() == [m1]
    assert reg.get(m1) is first  # cached, not loaded again
    reg.get(m2)
    assert reg.loaded() == [m2]  # the first was evicted
    assert reg.get(m1) is not first  # and is loaded afresh
    assert reg.loaded() == [m1]


def test_registry_lru_evicts_the_least_recently_used(small_models):
    m1, m2, m3 = small_models
    reg = Registry([m1, m2, m3], default=m1, capacity=2, device="cpu")
    reg.get(m1)
    reg.get(m2)
    reg.get(m1)  # m1 is now the most recently used
    reg.get(m3)
    assert reg.loaded() == [m1, m3]


# --- starting without the Hub ---------------------------------------------------------------------------------


def test_offline_start_builds_the_page_and_says_why(offline_hub, tmp_path, monkeypatch):
    from vit_demo.ui import build_demo

    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))
    bundled = bundled_available()
    start = time.perf_counter()
    demo = build_demo(Registry(["nobody/not-cached"], default="nobody/not-cached", device="cpu"))
    elapsed = time.perf_counter() - start
    assert elapsed < 15, f"building the page offline took {elapsed:.1f} s"
    status = [b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "status"]
    assert len(status) == 1
    text = status[0].value
    assert "nobody/not-cached" in text and "could not be loaded" in text
    if bundled:
        assert "bundled" in text
        assert demo.registry.default == BUNDLED_NAME
        assert demo.registry.loaded() == [BUNDLED_NAME]
    else:
        assert "VIT_DEMO_MODEL" in text
        assert demo.registry.loaded() == []


def test_offline_start_falls_back_to_a_bundled_model(offline_hub, tmp_path, monkeypatch, small_models):
    """The other branch, whether or not vit_demo/weights exists yet: a small checkpoint stands in for it."""
    from vit_demo import registry as registry_mod
    from vit_demo.ui import build_demo

    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))
    monkeypatch.setattr(registry_mod, "BUNDLED", small_models[0])
    assert bundled_available()
    demo = build_demo(Registry(["nobody/not-cached"], default="nobody/not-cached", device="cpu"))
    text = next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "status").value
    assert "nobody/not-cached" in text and "could not be loaded" in text and "bundled" in text
    assert demo.registry.default == BUNDLED_NAME
    assert demo.registry.choices[0] == BUNDLED_NAME and "nobody/not-cached" in demo.registry.choices
    assert demo.registry.loaded() == [BUNDLED_NAME]
    dropdown = next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "model")
    assert dropdown.value == BUNDLED_NAME


def test_offline_the_page_offers_only_models_that_can_load(offline_hub, tmp_path, monkeypatch, small_models):
    """Offline, a Hub model that is not in the cache is not offered; a cached one and a local folder are."""
    from vit_demo.ui import build_demo

    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))
    lay_out_hub_cache(offline_hub, "org/cached-vit", Path(small_models[1]))
    reg = Registry([small_models[0], "org/cached-vit", "nobody/not-cached"], default=small_models[0], device="cpu")
    demo = build_demo(reg)
    dropdown = block(demo, "model")
    assert [value for _, value in dropdown.choices] == ["m1", "org/cached-vit"]
    assert "1 model not downloaded here is not offered" in dropdown.info
    assert demo.registry.get("org/cached-vit").config.depth == 2  # what is offered loads


def test_offline_start_shows_what_the_bundled_model_knows(offline_hub, tmp_path, monkeypatch):
    """While the bundled model serves, a box says it knows only clothing, and its examples come first."""
    from vit_demo.ui import build_demo

    assert bundled_available(), "vit_demo/weights holds no bundled model"
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))
    demo = build_demo(Registry(["nobody/not-cached"], default="nobody/not-cached", device="cpu"))
    note = block(demo, "fallback-note")
    assert note.visible and "knows only 10 kinds of clothing" in note.value
    for kind in ("T-shirt/top", "Trouser", "Bag", "Ankle boot"):
        assert kind in note.value
    dataset = block(demo, "examples")
    first = [Path(str(sample[0])).name for sample in dataset.samples[:5]]
    assert all(name.startswith("fashion-mnist") for name in first), first
    info = block(demo, "model-info").value
    assert "6 layers, 4 heads, 28×28 px input in 4×4 patches, 10 classes" in info and "bundled" in info


def test_the_model_facts_show_from_the_start_and_no_server_path(served):
    """Layers, heads, input, classes, parameters (counted by transformers itself), precision and source."""
    from transformers import ViTForImageClassification

    _, path, demo = served
    info = block(demo, "model-info").value
    n = sum(p.numel() for p in ViTForImageClassification.from_pretrained(path).parameters())
    assert info.startswith(f"**{path.name}**: 2 layers, 4 heads, 224×224 px input in 32×32 patches, 7 classes, "
                           f"{n / 1e3:.0f} k parameters, "), info
    assert "Weights: a local folder, transformers format." in info
    assert [value for _, value in block(demo, "model").choices] == [path.name]
    assert str(path) not in json.dumps(demo.get_config_file(), default=str)


def test_a_model_named_by_its_display_name_or_registry_name_answers(served):
    from gradio_client import handle_file

    client, path, _ = served
    for name in (path.name, str(path)):
        assert len(confidences(client.predict(image=handle_file(CHELSEA), top_k=2, model=name, api_name="/classify"))) == 2


def test_a_refusal_is_one_log_line_without_traceback(served, tmp_path, caplog, capfd):
    import httpx
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    client, _, _ = served
    fake = tmp_path / "photo.jpg"
    fake.write_text("this is text, not a JPEG\n" * 20)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0" + b"not the rest of a JPEG" * 20)
    capfd.readouterr()
    caplog.set_level(logging.INFO, logger="vit_demo")
    for path, error, message in [
        (fake, httpx.HTTPStatusError, "This file is not an image: upload a JPEG, PNG, WebP, BMP, GIF or TIFF photo."),
        (broken, AppError, "This file could not be read as an image: upload a JPEG, PNG, WebP, BMP, GIF or TIFF photo."),
    ]:
        caplog.clear()
        with pytest.raises(error):
            client.predict(image=handle_file(str(path)), api_name="/classify")
        refused = [r.getMessage() for r in caplog.records if r.getMessage().startswith("refused:")]
        assert len(refused) == 1 and refused[0].startswith(f"refused: {message}"), refused
    assert "Traceback" not in capfd.readouterr().err


def test_start_says_in_the_log_which_model_serves_and_why(offline_hub, tmp_path, monkeypatch, small_models, caplog):
    from vit_demo import registry as registry_mod
    from vit_demo.ui import build_demo

    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))
    caplog.set_level(logging.INFO, logger="vit_demo")
    build_demo(Registry([small_models[0]], default=small_models[0], device="cpu"))
    assert f"Serving {small_models[0]}." in caplog.text
    caplog.clear()
    monkeypatch.setattr(registry_mod, "BUNDLED", small_models[0])
    build_demo(Registry(["nobody/not-cached"], default="nobody/not-cached", device="cpu"))
    lines = [r for r in caplog.records if "could not be loaded" in r.getMessage()]
    assert len(lines) == 1 and lines[0].levelno == logging.WARNING
    message = lines[0].getMessage()
    assert "nobody/not-cached" in message and "HF_HUB_OFFLINE" in message and "bundled" in message


# --- how the page draws and writes its answers ---------------------------------------------------------------


@pytest.mark.parametrize("p, text", [
    (0.5, "50.0%"), (0.0123, "1.2%"), (0.0021, "0.21%"), (0.00991, "0.99%"), (0.000034, "0.0034%"),
    (2e-6, "0.00020%"), (1e-7, "<0.0001%"), (0.0, "0%"), (1.0, "100.0%"), (0.99999, ">99.9%"),
])
def test_percent_shows_small_probabilities_as_non_zero(p, text):
    from vit_demo.ui.classify import percent

    assert percent(p) == text


def test_answer_table_lists_every_row_and_escapes_names():
    from vit_demo.ui.classify import table

    html = table([("<b>cat</b>", 0.6), ("dog & co", 0.002)])
    import html as html_lib

    assert "<b>" not in html and "dog & co" not in html
    assert "<b>cat</b>" in html_lib.unescape(html) and ">dog & co<" in html_lib.unescape(html)
    assert html.count("<tr>") == 2 and ">60.0%<" in html and ">0.20%<" in html
    assert table([]) == ""


@pytest.mark.parametrize("n, columns", [(1, 1), (3, 3), (4, 2), (6, 3), (8, 4), (12, 4), (16, 4), (7, 7)])
def test_head_grid_is_laid_out_with_no_blank_tile(n, columns):
    from vit_demo.ui.figures import GAP, grid_columns, numbered_sheet

    assert grid_columns(n) == columns
    rows = n // columns
    assert columns * rows == n and columns >= rows
    w, h = 60, 30
    sheet = numbered_sheet([Image.new("RGB", (w, h), (0, 128, 0))] * n)
    assert sheet.size == (columns * w + (columns - 1) * GAP, rows * h + (rows - 1) * GAP)
    # Every tile is drawn (green), with its number in a dark box in its top-left corner.
    pixels = np.asarray(sheet)
    for i in range(n):
        x, y = (i % columns) * (w + GAP), (i // columns) * (h + GAP)
        assert tuple(pixels[y + h - 1, x + w - 1]) == (0, 128, 0)
        assert tuple(pixels[y + 1, x + 1]) == (20, 20, 20)


def test_heads_share_one_colour_scale():
    """A nearly flat head is drawn in the colour of its value on the scale all heads share, not stretched to hot."""
    import torch

    from vit_demo.explain import colorize
    from vit_demo.ui import figures

    crop = torch.zeros(3, 64, 64, dtype=torch.uint8)
    peaked = torch.tensor([[0.0, 0.0], [0.0, 1.0]])
    flat = torch.full((2, 2), 0.25)
    sheet, low, high = figures.draw(crop, torch.stack([peaked, flat]), alpha=1.0)
    assert (low, high) == (0.0, 1.0)
    second = np.asarray(sheet)[:, 64 + figures.GAP:]  # the flat head's tile
    assert np.abs(second[-1, -1].astype(int) - colorize(np.array(0.25)).astype(int)).max() <= 1


@pytest.mark.parametrize("case", ["unreachable", "gated"])
def test_a_hub_out_of_reach_hides_models_a_refusing_hub_does_not(fake_hub, tmp_path, monkeypatch, small_models, case):
    """Without HF_HUB_OFFLINE, the page counts the Hub as out of reach only when it could not be reached at all."""
    from conftest import free_port
    from huggingface_hub import constants

    from vit_demo import registry as registry_mod
    from vit_demo.ui import build_demo

    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))
    monkeypatch.setattr(registry_mod, "BUNDLED", small_models[0])
    if case == "unreachable":
        monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    default = "someone/gated-vit" if case == "gated" else "someone/any-vit"
    demo = build_demo(Registry([default, "other/not-cached"], default=default, device="cpu"))
    assert demo.registry.default == BUNDLED_NAME
    offered = [value for _, value in block(demo, "model").choices]
    if case == "unreachable":
        assert offered == [BUNDLED_NAME]
    else:  # the Hub answered: the other models may well load
        assert offered == [BUNDLED_NAME, default, "other/not-cached"]


def test_a_photo_the_model_answers_with_nan_gets_a_sentence(served, monkeypatch):
    """A checkpoint that passes the load check (a grey photo) and gives NaN logits for some photo: that request is
    refused with a sentence, the NaN is not kept as the photo's answer, and the next photo is answered."""
    import torch
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    client, path, demo = served
    clf = demo.registry.get(str(path))
    runtime = clf.runtime
    monkeypatch.setattr(clf, "runtime", lambda x: torch.full((x.shape[0], len(clf.labels)), float("nan")))
    sentence = ("The model gave answers that are not numbers (NaN or infinite logits) for this photo: try another "
                "photo or another model.")
    photo = str(EXAMPLES / "rocket.jpg")
    for api_name in ("/classify", "/explain"):
        with pytest.raises(AppError) as info:
            client.predict(image=handle_file(photo), api_name=api_name)
        assert str(info.value) == sentence
    monkeypatch.setattr(clf, "runtime", runtime)
    assert len(confidences(client.predict(image=handle_file(photo), top_k=3, api_name="/classify"))) == 3

"""The "Inside" tab and its endpoint, on the launched app: `/attention_distance` through gradio_client and raw
HTTP, and the tab in a real browser (headless Chromium, Playwright).

The app serves the bundled Fashion-MNIST model (28x28 grey crops, 4-pixel patches: a 7x7 grid, 6 layers of 4
heads), a small random-weight transformers ViT (224 px, 32-pixel patches, RGB) and a distilled DeiT (two prefix
tokens). Screenshots go to test-artifacts/ (git-ignored); Chromium must be at /usr/bin/chromium.
"""

from __future__ import annotations

import io
import math
import os

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import EXAMPLES, chromium, launched, make_fruit_checkpoint, make_transformers
from conftest import screenshot as _shot
from vit_demo import inside as ins
from vit_demo import load_classifier
from vit_demo.registry import BUNDLED, BUNDLED_NAME, Registry

CHELSEA = str(EXAMPLES / "chelsea.jpg")
SNEAKER = "fashion-mnist-sneaker-9.png"
WAIT_MS = 60_000  # the machine may be busy with other work: wait generously, never sleep


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The app, launched; yields a dict with the url, a gradio_client Client and the served checkpoints."""
    from gradio_client import Client

    tmp = tmp_path_factory.mktemp("inside")
    fruit = str(make_fruit_checkpoint(tmp / "fruit"))
    deit = str(make_transformers(tmp / "deit", "small", distilled=True).path)
    registry = Registry([BUNDLED_NAME, fruit, deit], default=BUNDLED_NAME, device="cpu")
    # These tests switch between three models from one address many times a minute: the switch limit per visitor
    # is not what they look at (test_crowd is).
    with pytest.MonkeyPatch.context() as mp, launched(registry, tmp) as (demo, url):
        mp.setenv("VIT_DEMO_SWITCHES_PER_MINUTE", "1000")
        client = Client(url, download_files=False, verbose=False)
        try:
            yield dict(url=url, client=client, demo=demo, fruit=fruit, deit=deit, tmp=tmp)
        finally:
            client.close()


def np_mean_attention_distance(attns: list[torch.Tensor], num_prefix: int, grid: tuple[int, int], p: int) -> np.ndarray:
    """The definition in numpy: sum_j a_ij |c_i - c_j| / sum_j a_ij over patch keys j, averaged over patch queries i."""
    gh, gw = grid
    centres = np.array([((r + 0.5) * p, (c + 0.5) * p) for r in range(gh) for c in range(gw)])  # (n, 2)
    dist = np.sqrt(((centres[:, None, :] - centres[None, :, :]) ** 2).sum(-1))  # (n, n)
    out = []
    for a in attns:
        a = a.double().numpy()[:, num_prefix:, num_prefix:]  # (heads, n, n)
        out.append(((a * dist).sum(-1) / a.sum(-1)).mean(-1))  # (heads,)
    return np.stack(out)  # (layers, heads)


def np_prefix_share(attns: list[torch.Tensor], num_prefix: int) -> np.ndarray:
    """The attention patch queries give the prefix keys, averaged over the queries: (layers, heads)."""
    return np.stack([a.double().numpy()[:, num_prefix:, :num_prefix].sum(-1).mean(-1) for a in attns])


# --- /attention_distance ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("which, photo, shape, grid, p, prefix", [
    ("bundled", str(EXAMPLES / SNEAKER), (6, 4), (7, 7), 4, 1),
    ("fruit", CHELSEA, (2, 4), (7, 7), 32, 1),
    ("deit", CHELSEA, (2, 4), (4, 4), 8, 2),
])
def test_attention_distance_is_the_table_of_the_models_own_attention(served, which, photo, shape, grid, p, prefix):
    """The endpoint's table has one row per layer and one column per head, and equals the definition computed in
    numpy (and vit_demo.inside) from the attention the model gives for the same file."""
    from gradio_client import handle_file

    model = {"bundled": None, "fruit": served["fruit"], "deit": served["deit"]}[which]
    kwargs = {} if model is None else {"model": model}  # the bundled model is the default: leave it out
    got = served["client"].predict(image=handle_file(photo), api_name="/attention_distance", **kwargs)
    assert got["model"] == (os.path.basename(model) if model else BUNDLED_NAME)  # local folders go by their name
    assert (got["layers"], got["heads"]) == shape and got["grid"] == list(grid) and got["patch_size"] == p
    table = np.array(got["distance_px"], dtype=np.float64)
    assert table.shape == shape

    clf = load_classifier(model or BUNDLED, device="cpu")
    assert clf.config.num_prefix_tokens == prefix
    with Image.open(photo) as im:
        crop, attns, _ = clf.attention(im)
    assert got["crop"] == list(crop.shape[-2:])
    want = np_mean_attention_distance(attns, prefix, grid, p)
    diff = np.abs(table - want).max()
    assert diff <= 1e-3, f"max difference to numpy {diff:.3g} px"
    lib = ins.mean_attention_distance(attns, prefix, grid, p).double().numpy()
    assert np.abs(table - lib).max() <= 1e-3
    share = np.array(got["prefix_share"], dtype=np.float64)
    assert share.shape == shape and np.abs(share - np_prefix_share(attns, prefix)).max() <= 1e-5
    assert ((0 <= share) & (share <= 1)).all()
    # The control: the table is not a constant that happens to be near every answer. The farthest patch centres
    # bound it, and the heads of a trained model differ.
    farthest = math.dist((0, 0), ((grid[0] - 1) * p, (grid[1] - 1) * p))
    assert 0 < table.min() and table.max() < farthest
    if which == "bundled":
        assert np.ptp(table) > 0.5, table


def _call_raw(url: str, data: list) -> str:
    """Calls /attention_distance over plain HTTP (as any script could, with no client checks); the event stream."""
    with httpx.Client(base_url=url, timeout=60) as http:
        response = http.post("gradio_api/call/attention_distance", json={"data": data})
        response.raise_for_status()
        event_id = response.json()["event_id"]
        return http.get(f"gradio_api/call/attention_distance/{event_id}").text


@pytest.mark.parametrize("where", ["/etc/passwd", "a photo outside the upload cache"])
def test_a_server_path_is_refused_before_anything_opens_it(served, monkeypatch, where):
    outside = served["tmp"] / "outside.jpg"
    Image.open(CHELSEA).save(outside)  # a real image: refused for where it is, not for what it is
    path = str(outside) if where.startswith("a photo") else where
    clf = served["demo"].registry.get(BUNDLED_NAME)
    opened = []
    walk = clf.walk
    monkeypatch.setattr(clf, "walk", lambda *a, **k: opened.append(a) or walk(*a, **k))
    for payload in ({"path": path}, {"path": path, "meta": {"_type": "gradio.FileData"}}):
        stream = _call_raw(served["url"], [payload, BUNDLED_NAME])
        assert "event: error" in stream, stream
        assert "Only images uploaded to this app can be used" in stream, stream
        assert "root:" not in stream and "Traceback" not in stream
    assert opened == []
    # The control: the same call with the photo uploaded is answered.
    from gradio_client import handle_file

    got = served["client"].predict(image=handle_file(str(outside)), api_name="/attention_distance")
    assert got["layers"] == 6 and len(opened) == 1


def test_a_model_not_on_offer_is_refused_in_one_sentence(served):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match="is not one of the models this app offers: pick one from the list"):
        served["client"].predict(image=handle_file(CHELSEA), model="/etc", api_name="/attention_distance")


# --- /layers and /patch ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["bundled", "fruit", "deit"])
def test_layers_reads_the_answer_after_every_block_and_the_last_is_classify(served, which):
    """/layers gives one top-k per block, equal to the library's read-out of the same file; its last layer is
    /classify's answer, label for label and probability for probability."""
    from gradio_client import handle_file

    model = {"bundled": None, "fruit": served["fruit"], "deit": served["deit"]}[which]
    photo = str(EXAMPLES / SNEAKER) if which == "bundled" else CHELSEA
    kwargs = {} if model is None else {"model": model}
    got = served["client"].predict(image=handle_file(photo), api_name="/layers", **kwargs)
    clf = load_classifier(model or BUNDLED, device="cpu")
    with Image.open(photo) as im:
        walk = clf.walk(im)
    assert len(got["layers"]) == clf.config.depth
    for i, layer in enumerate(got["layers"]):
        assert layer["layer"] == i + 1 and len(layer["top_k"]) == min(5, len(clf.labels))
        want = clf.top_k(walk["layer_logits"][i], 5)
        assert [t["label"] for t in layer["top_k"]] == [label for label, _ in want]
        assert np.allclose([t["probability"] for t in layer["top_k"]], [p for _, p in want], atol=1e-5)
    assert got["readout"] == ("the class token" if which != "deit" else ins.readout_name(clf.config))
    classify = served["client"].predict(image=handle_file(photo), top_k=5, api_name="/classify", **kwargs)
    last = got["layers"][-1]["top_k"]
    assert [c["label"] for c in classify["confidences"]] == [t["label"] for t in last]
    assert np.allclose([c["confidence"] for c in classify["confidences"]], [t["probability"] for t in last], atol=1e-5)
    assert got["final"]["label"] == classify["label"]
    assert got["final"]["probability_by_layer"][-1] == pytest.approx(last[0]["probability"], abs=1e-6)
    if which == "bundled":  # a trained model: the answer forms with depth
        assert got["final"]["probability_by_layer"][0] < got["final"]["probability_by_layer"][-1]


def test_patch_is_the_row_of_transformers_attention_and_the_cosine_of_its_states(served):
    """/patch for the transformers checkpoint: the attention grid is the query's row of transformers'
    output_attentions (one head, and the mean of the heads), the similarity grid numpy's cosine of its hidden
    states, both of the patch grid's size."""
    from gradio_client import handle_file
    from transformers import ViTForImageClassification

    ref = ViTForImageClassification.from_pretrained(served["fruit"], attn_implementation="eager").eval()
    clf = load_classifier(served["fruit"], device="cpu")
    with Image.open(CHELSEA) as im:
        x = clf.preprocess(im)
    with torch.no_grad():
        out = ref(pixel_values=x, output_attentions=True, output_hidden_states=True)
    for row, col, layer, head in [(1, 1, 1, "mean"), (3, 5, 2, "2"), (7, 7, 2, "4")]:
        got = served["client"].predict(image=handle_file(CHELSEA), row=row, col=col, layer=layer, head=head,
                                       model=served["fruit"], api_name="/patch")
        assert got["grid"] == [7, 7] and (got["row"], got["col"], got["layer"]) == (row, col, layer)
        q = 1 + (row - 1) * 7 + (col - 1)
        assert got["token"] == q
        a = out.attentions[layer - 1][0]  # (heads, N, N)
        a = a.mean(0) if head == "mean" else a[int(head) - 1]
        attention = np.array(got["attention"])
        assert attention.shape == (7, 7)
        assert np.abs(attention - a[q, 1:].reshape(7, 7).numpy()).max() <= 1e-5
        assert got["attention_to_prefix"]["class"] == pytest.approx(a[q, 0].item(), abs=1e-5)
        T = out.hidden_states[layer][0].double().numpy()
        cos = T @ T[q] / (np.linalg.norm(T, axis=1) * np.linalg.norm(T[q]))
        similarity = np.array(got["similarity"])
        assert similarity.shape == (7, 7) and np.abs(similarity - cos[1:].reshape(7, 7)).max() <= 1e-5
        assert similarity[row - 1, col - 1] == pytest.approx(1.0, abs=1e-6)
    # Defaults: the centre patch, the last layer, the mean of the heads, of the model named (not the default
    # model's 6 layers): 7x7 patches and 2 layers for this one, 4x4 and 2 for the distilled DeiT.
    got = served["client"].predict(image=handle_file(CHELSEA), model=served["fruit"], api_name="/patch")
    assert (got["row"], got["col"], got["layer"], got["head"]) == (4, 4, 2, "mean")
    got = served["client"].predict(image=handle_file(CHELSEA), model=served["deit"], api_name="/patch")
    assert (got["grid"], got["row"], got["col"], got["layer"]) == ([4, 4], 3, 3, 2)
    assert set(got["attention_to_prefix"]) == {"class", "distillation"} and got["token"] == 2 + 2 * 4 + 2


@pytest.mark.parametrize("inputs, sentence", [
    (dict(row=8), "The row must be from 1 to 7 for this model, not 8."),
    (dict(col=0), "The column must be from 1 to 7 for this model, not 0."),
    (dict(row=2.5), "The row must be a whole number from 1 to 7, not '2.5'."),
    (dict(layer=7), "The layer must be from 1 to 6 for this model, not 7."),
    (dict(head="5"), "The head must be from 1 to 4 for this model, not 5."),
    (dict(head="all"), "The head must be a whole number from 1 to 4, not 'all'."),
])
def test_patch_refuses_what_lies_outside_the_model_in_one_sentence(served, inputs, sentence):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError) as refused:
        served["client"].predict(image=handle_file(str(EXAMPLES / SNEAKER)), api_name="/patch", **inputs)
    assert str(refused.value) == sentence


def test_view_api_lists_patch_and_layers_with_their_defaults(served):
    named = served["client"].view_api(return_format="dict", print_info=False)["named_endpoints"]
    params = {name: {p["parameter_name"]: p for p in named[name]["parameters"]} for name in ("/patch", "/layers")}
    assert list(params["/patch"]) == ["image", "row", "col", "layer", "head", "model"]
    assert list(params["/layers"]) == ["image", "model"]
    defaults = {name: p["parameter_default"] for name, p in params["/patch"].items() if p["parameter_has_default"]}
    # Nothing of the default model's size: a call that leaves them out gets the centre and the last layer of its model.
    assert defaults == {"row": None, "col": None, "layer": None, "head": "mean", "model": BUNDLED_NAME}
    assert not {"/inside_patch", "/inside_pick", "/inside_pick_patch", "/inside_tokens", "/inside_photo"} & set(named)


def test_patch_and_layers_over_raw_http_with_every_input(served):
    """A raw call fills in no defaults: each input is sent, as a script without gradio_client would."""
    from conftest import raw_call, raw_upload

    photo = raw_upload(served["url"], str(EXAMPLES / SNEAKER))
    event, got = raw_call(served["url"], "patch", [photo, 2, 6, 3, "1", BUNDLED_NAME])
    assert event == "complete", got
    got = got[0]
    assert (got["row"], got["col"], got["layer"], got["head"]) == (2, 6, 3, 1)
    assert np.array(got["attention"]).shape == (7, 7)
    event, got = raw_call(served["url"], "layers", [photo, BUNDLED_NAME])
    assert event == "complete" and len(got[0]["layers"]) == 6
    event, message = raw_call(served["url"], "patch", [photo, 2, 6, 3, "1", served["deit"] + "/.."])
    assert event == "error" and "Traceback" not in str(message)


# --- the tab in a browser ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser(served):
    with chromium() as b:
        yield b


def _loaded(page, selector: str) -> dict:
    """Waits until the <img> in `selector` has loaded; its natural size. (Images load lazily: scrolled to first.)"""
    page.locator(f"{selector} img").first.wait_for(state="attached")
    page.locator(selector).first.scroll_into_view_if_needed()
    page.locator(f"{selector} img").first.wait_for(state="visible")
    page.wait_for_function(
        f"() => {{ const i = document.querySelector('{selector} img'); return i && i.complete && i.naturalWidth > 0; }}",
        timeout=WAIT_MS,
    )
    return page.evaluate(f"() => {{ const i = document.querySelector('{selector} img'); return [i.naturalWidth, i.naturalHeight, i.src]; }}")


def _image(page, selector: str) -> np.ndarray:
    """The pixels of the <img> in `selector`, once loaded, as the server sent them."""
    _, _, src = _loaded(page, selector)
    response = page.request.get(src)
    assert response.ok, f"GET {src}: {response.status}"
    return np.asarray(Image.open(io.BytesIO(response.body())).convert("RGB"))


def _dots(page, count: int) -> list[tuple[int, int, float]]:
    """The plotted dots as (layer, head, distance), read from the plot's SVG once it holds `count` of them."""
    query = "() => Array.from(document.querySelectorAll('#inside-distance [aria-label^=\"layer: \"]'), e => e.getAttribute('aria-label'))"
    page.wait_for_function(f"() => ({query})().length === {count}", timeout=WAIT_MS)
    dots = []
    for label in page.evaluate(query):  # "layer: 1; mean attention distance (px): 13.62; head: head 1"
        fields = dict(part.split(": ", 1) for part in label.split("; "))
        dots.append((int(fields["layer"]), int(fields["head"].removeprefix("head ")), float(fields["mean attention distance (px)"])))
    return dots


def test_inside_tab_shows_all_four_parts(browser, served):
    """Opened before any photo, the tab shows the model-only parts and says what the photo parts need; with an
    example picked, all four parts; with another model picked, the parts of that model."""
    from playwright.sync_api import expect

    context = browser.new_context(viewport={"width": 1280, "height": 1000})
    context.set_default_timeout(WAIT_MS)
    page = context.new_page()
    try:
        page.goto(served["url"], wait_until="domcontentloaded")
        page.get_by_role("tab", name="Inside").filter(visible=True).first.click()
        # No photo yet: the filters and position embeddings are there, the photo parts say what they need.
        # They are the bundled model's own (PNG: lossless), drawn from the weights in the file.
        bundled = load_classifier(BUNDLED, device="cpu").model
        filters = ins.draw_filters(ins.filter_components(bundled.patch_embed.proj.weight)[0])
        positions = ins.draw_position_similarity(ins.position_similarity(bundled.pos_embed, 1, (7, 7)))
        assert np.array_equal(_image(page, "#inside-filters"), np.asarray(filters))
        assert np.array_equal(_image(page, "#inside-positions"), np.asarray(positions))
        expect(page.locator("#inside-filters-caption")).to_contain_text("The first 16 principal components of the 128 filters (1×4×4")
        expect(page.locator("#inside-filters-caption")).to_contain_text("100.0%")
        expect(page.locator("#inside-counts")).to_contain_text("Give a photo")
        expect(page.locator("#inside-patches img")).to_have_count(0)
        _shot(page, "inside-no-photo.png")

        # An example: the patches, their counts, and one dot per head in the plot.
        page.locator(".gallery").get_by_text(SNEAKER).or_(page.locator(f'.gallery img[src*="{SNEAKER}"]')).first.click()
        expect(page.locator("#inside-counts")).to_contain_text(
            "49 patches (7×7 of 4×4 pixels, from a 28×28 crop) + 1 prefix token (class) = a sequence of 50 tokens", timeout=WAIT_MS)
        width, height, _ = _loaded(page, "#inside-patches")
        assert (width, height) == (280, 280), (width, height)  # 28 px enlarged 10 times, so that cells are 40 px
        expect(page.locator("#inside-distance-caption")).to_contain_text("6 layers × 4 heads")
        # One dot per head and layer, at the distance the model's own attention gives for this file.
        dots = _dots(page, 6 * 4)
        clf = load_classifier(BUNDLED, device="cpu")
        with Image.open(EXAMPLES / SNEAKER) as im:
            _, attns, _ = clf.attention(im)
        want = np_mean_attention_distance(attns, 1, (7, 7), 4)
        assert sorted((layer, head) for layer, head, _ in dots) == [(l, h) for l in range(1, 7) for h in range(1, 5)]
        diff = max(abs(d - want[layer - 1, head - 1]) for layer, head, d in dots)
        assert diff <= 1e-3, f"the plotted distances differ from numpy's by up to {diff:.3g} px"
        _shot(page, "inside-example.png")

        # The numbers behind the plot, as the endpoint gives them.
        page.get_by_text("The numbers (as the /attention_distance endpoint returns them)").click()  # no button
        expect(page.locator("#inside-table")).to_contain_text("distance_px", timeout=WAIT_MS)
        expect(page.locator("#inside-table")).to_contain_text("prefix_share")
        page.get_by_text("The numbers (as the /layers endpoint returns them)").click()
        expect(page.locator("#inside-layers-json")).to_contain_text("probability_by_layer", timeout=WAIT_MS)
        expect(page.locator("#inside-table")).to_contain_text(BUNDLED_NAME)

        # Another model: its own filters (RGB, 3x32x32) and patches (7x7 of 32 px); the table of the old one goes.
        model = page.locator("#model input")
        model.click()
        page.get_by_role("option", name="fruit", exact=True).click()
        expect(page.locator("#inside-filters-caption")).to_contain_text("(3×32×32 numbers each, drawn in RGB)", timeout=WAIT_MS)
        expect(page.locator("#inside-counts")).to_contain_text("49 patches (7×7 of 32×32 pixels, from a 224×224 crop)", timeout=WAIT_MS)
        expect(page.locator("#inside-distance-caption")).to_contain_text("2 layers × 4 heads")
        assert {layer for layer, _, _ in _dots(page, 2 * 4)} == {1, 2}
        expect(page.locator("#inside-table")).not_to_contain_text("distance_px")
        _shot(page, "inside-other-model.png")
    finally:
        context.close()


SIZES = {"desktop": {"width": 1280, "height": 900}, "phone": {"width": 390, "height": 844}}


def _src(page, selector: str) -> str:
    return page.evaluate(f"() => {{ const i = document.querySelector('{selector} img'); return i ? i.src : ''; }}")


def _click_patch(page, row: int, col: int, cell: int) -> None:
    """Clicks the middle of patch (row, col), from 0, on the picker, where Gradio's select maps it back."""
    img = page.locator("#inside-pick img").first
    box = img.bounding_box()
    nw, nh = page.evaluate("() => { const i = document.querySelector('#inside-pick img'); return [i.naturalWidth, i.naturalHeight]; }")
    r = min(box["width"] / nw, box["height"] / nh, 1)  # as Gradio's ImagePreview: fitted, never enlarged, centred
    x0, y0 = (box["width"] - nw * r) / 2, (box["height"] - nh * r) / 2
    # A position within the element: Playwright scrolls it into view and waits for it to stand still first.
    img.click(position={"x": x0 + (col + 0.5) * cell * r, "y": y0 + (row + 0.5) * cell * r})


@pytest.mark.parametrize("size", list(SIZES))
def test_clicking_two_patches_redraws_both_maps(browser, served, size):
    """On the Inside tab, with an example picked: the centre patch is shown first; a click on another patch moves
    the pick, and both maps change to that patch's attention and similarity, exactly as the library draws them; a
    second click moves it again."""
    from playwright.sync_api import expect

    phone = size == "phone"
    context = browser.new_context(viewport=SIZES[size], is_mobile=phone, has_touch=phone)
    context.set_default_timeout(WAIT_MS)
    page = context.new_page()
    clf = load_classifier(BUNDLED, device="cpu")
    with Image.open(EXAMPLES / SNEAKER) as im:
        walk = clf.walk(im)
    cell = 4 * ins.cell_scale(4)
    try:
        page.goto(served["url"], wait_until="domcontentloaded")
        page.locator(".gallery").get_by_text(SNEAKER).or_(page.locator(f'.gallery img[src*="{SNEAKER}"]')).first.click()
        page.get_by_role("tab", name="Inside").filter(visible=True).first.click()
        caption = page.locator("#inside-pick-caption")
        expect(caption).to_contain_text("Patch row 4, column 4 (token 25), layer 6, the mean of the heads", timeout=WAIT_MS)
        before = {s: _image(page, s) for s in ("#inside-patch-attention", "#inside-patch-similarity")}
        seen = [before]
        for row, col in [(1, 5), (5, 1)]:
            srcs = {s: _src(page, s) for s in before}
            _click_patch(page, row, col, cell)
            expect(caption).to_contain_text(f"Patch row {row + 1}, column {col + 1} (token {1 + row * 7 + col})",
                                            timeout=WAIT_MS)
            for s in srcs:
                page.wait_for_function(f"() => {{ const i = document.querySelector('{s} img'); return i && i.src !== {srcs[s]!r}; }}",
                                       timeout=WAIT_MS)
            now = {s: _image(page, s) for s in before}
            view = ins.patch_view(walk["attns"], walk["tokens"], 1, (7, 7), row, col, 5)
            for s, key, label in [("#inside-patch-attention", "attention", "attention weight"),
                                  ("#inside-patch-similarity", "similarity", "cosine similarity")]:
                want = np.asarray(ins.draw_patch_map(walk["crop"], view[key], 4, row, col, label))
                assert np.array_equal(now[s], want), f"{s} after clicking ({row}, {col}) is not the library's map"
                assert all(not np.array_equal(now[s], old[s]) for old in seen), f"{s} did not change"
            assert page.locator("#inside-row input[type=number]").input_value() == str(row + 1)
            assert page.locator("#inside-col input[type=number]").input_value() == str(col + 1)
            seen.append(now)
            page.locator("#inside-pick-row").scroll_into_view_if_needed()
            _shot(page, f"inside-pick-{size}-{row + 1}-{col + 1}.png", full_page=False)
        _shot(page, f"inside-walk-{size}.png")
    finally:
        context.close()

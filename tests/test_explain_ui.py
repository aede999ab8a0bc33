"""Class-specific maps and their faithfulness through the launched app: `/explain` with a target and
`/faithfulness`, over gradio_client and raw HTTP, and the Attention tab in a real browser (headless Chromium).

The app serves the bundled Fashion-MNIST model by default (trained weights; 28x28 grey crops in a 7x7 grid of
4-pixel patches, 6 layers of 4 heads) and a small random-weight transformers ViT with 7 named classes (224 px
crops, 32-pixel patches, 2 layers). The reference is the library loaded on its own (`load_classifier`) on the
same file. Screenshots go to test-artifacts/ (git-ignored); Chromium must be at /usr/bin/chromium.
"""

from __future__ import annotations

import io
import re
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from conftest import EXAMPLES, chromium, launched, make_fruit_checkpoint
from conftest import raw_call as call
from conftest import raw_upload as upload
from conftest import screenshot as _shot
from vit_demo import load_classifier
from vit_demo import faithfulness as faith
from vit_demo.ui.faith import COMPARED
from vit_demo.registry import BUNDLED, BUNDLED_NAME, Registry

SNEAKER = str(EXAMPLES / "fashion-mnist-sneaker-9.png")
CHELSEA = str(EXAMPLES / "chelsea.jpg")
NOT_UPLOADED = "Only images uploaded to this app can be used"
SIZES = {"desktop": {"width": 1280, "height": 900}, "phone": {"width": 390, "height": 844}}
WAIT_MS = 120_000  # the machine may be busy with other work: wait generously, never sleep
TIMEOUT = 120


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from gradio_client import Client

    tmp = tmp_path_factory.mktemp("explain_ui")
    fruit = str(make_fruit_checkpoint(tmp / "fruit"))
    with launched(Registry([BUNDLED_NAME, fruit], default=BUNDLED_NAME, device="cpu"), tmp) as (demo, url):
        client = Client(url, download_files=False, verbose=False)
        try:
            yield dict(url=url, client=client, demo=demo, fruit=fruit, tmp=tmp)
        finally:
            client.close()


@pytest.fixture(scope="module")
def bundled():
    return load_classifier(BUNDLED, device="cpu")


@pytest.fixture(scope="module")
def fruit(served):
    return load_classifier(served["fruit"], device="cpu")


def pixels(result) -> np.ndarray:
    """An image output of the client (a FileData dict), fetched by its URL, as int RGB pixels."""
    assert isinstance(result, dict) and result.get("url"), result
    response = httpx.get(result["url"], timeout=TIMEOUT)
    response.raise_for_status()
    return np.asarray(Image.open(io.BytesIO(response.content)).convert("RGB"), dtype=int)


def mean_difference(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(float) - b.astype(float)).mean())


# --- /explain with a target -----------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["relevance", "gradient_rollout", "rollout", "attention"])
def test_explain_follows_the_target_for_class_specific_methods_only(served, fruit, method):
    """The fruit model's top two classes, through /explain: the class-specific maps differ and are the library's
    own for each class (clf.explain on the same file, 224 px crops drawn as they are); the class-agnostic maps
    are the same for both. Without a target, the map is the top class's."""
    from gradio_client import handle_file

    client = served["client"]
    photo = Image.open(CHELSEA)
    labels = [label for label, _ in fruit.predict(photo, k=2)]
    options = {"rollout": dict(discard_ratio=0.9), "attention": dict(layer=-1), "gradient_rollout": dict(discard_ratio=0.9)}.get(method, {})
    layer = {"layer": 2} if method == "attention" else {}  # the client's default is the bundled model's 6 layers
    got = [pixels(client.predict(image=handle_file(CHELSEA), method=method, model="fruit", target=label, api_name="/explain",
                                 **layer)) for label in labels]
    want = [np.asarray(fruit.explain(photo, method, target=label, **options), dtype=int) for label in labels]
    for label, g, w in zip(labels, got, want):
        assert np.abs(g - w).max() <= 1, f"{method} for {label}: the page's map is not the library's"
    between = mean_difference(got[0], got[1])
    if method in ("relevance", "gradient_rollout"):
        assert between > 2, f"{method}: the maps of {labels[0]} and {labels[1]} differ by only {between:.2f} on average"
    else:
        assert np.array_equal(got[0], got[1]), f"{method} changed with the class ({between:.2f} on average)"
    top = pixels(client.predict(image=handle_file(CHELSEA), method=method, model="fruit", api_name="/explain", **layer))
    assert np.array_equal(top, got[0]), "without a target the map should be the top class's"


@pytest.mark.parametrize("api", ["/explain", "/faithfulness"])
def test_layer_and_head_left_out_mean_the_last_layer_of_the_model_named(served, fruit, api):
    """Only image, method and another model (the fruit model has 2 layers, the default model 6): the map and its
    score are of the fruit model's last layer, not a refusal of the default model's depth."""
    from gradio_client import handle_file

    result = served["client"].predict(image=handle_file(CHELSEA), method="attention", model="fruit", api_name=api)
    photo = Image.open(CHELSEA)
    if api == "/explain":
        want = np.asarray(fruit.explain(photo, "attention", layer=1), dtype=int)  # the second of two, from 0
        assert np.abs(pixels(result) - want).max() <= 1, "not the fruit model's last layer"
    else:
        want = fruit.faithfulness(photo, "attention", layer=1)
        assert (result["deletion_auc"], result["insertion_auc"]) == pytest.approx(
            (want["deletion_auc"], want["insertion_auc"]), abs=1e-4)
        other = fruit.faithfulness(photo, "attention", layer=0)["deletion_auc"]
        assert other != pytest.approx(want["deletion_auc"], abs=1e-4), "the two layers' scores do not tell them apart"


def test_the_trained_models_relevance_differs_between_its_top_two_classes(served, bundled):
    """The bundled model (trained) on a sneaker: the relevance maps for Sneaker and its runner-up differ, and the
    label may be given in any case."""
    from gradio_client import handle_file

    client = served["client"]
    (first, _), (second, _) = bundled.predict(Image.open(SNEAKER), k=2)
    assert first == "Sneaker"
    maps = {label: pixels(client.predict(image=handle_file(SNEAKER), method="relevance", target=label, api_name="/explain"))
            for label in (first, second, second.upper())}
    assert mean_difference(maps[first], maps[second]) > 2
    assert np.array_equal(maps[second], maps[second.upper()])
    # The maps themselves, from the library: far from proportional (rank correlation well below 1).
    a, b = (bundled.heatmap(Image.open(SNEAKER), "relevance", target=label).flatten().numpy() for label in (first, second))
    rho = np.corrcoef(np.argsort(np.argsort(a)), np.argsort(np.argsort(b)))[0, 1]
    assert rho < 0.95, f"rank correlation {rho:.3f}"


def test_an_unknown_or_malformed_target_gets_one_sentence(served):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    client = served["client"]
    with pytest.raises(AppError) as info:
        client.predict(image=handle_file(SNEAKER), method="relevance", target="tabby cat", api_name="/explain")
    message = str(info.value)
    assert "'tabby cat' is not one of this model's 10 classes" in message and "Traceback" not in message
    with pytest.raises(AppError) as info:  # a class-agnostic method still refuses a class the model does not have
        client.predict(image=handle_file(SNEAKER), method="rollout", target="10", api_name="/explain")
    assert "'10' is not one of this model's 10 classes" in str(info.value)
    # Raw HTTP: a huge label is quoted cut short; a list is not a label.
    photo = upload(served["url"], SNEAKER)
    for target, expected in (("x" * 100_000, "x…' is not one of this model's 10 classes"),
                             (["Sneaker"], "The class to explain must be given as its label in text")):
        event, out = call(served["url"], "explain", [photo, "relevance", None, 6, "mean", "mean", 0.9, 0.6, target])
        assert event == "error" and expected in out, out[:300]
        assert len(out) < 300 and out.endswith(".")


def test_view_api_lists_target_and_faithfulness_with_defaults(served):
    named = served["client"].view_api(return_format="dict", print_info=False)["named_endpoints"]
    explain = {p["parameter_name"]: p for p in named["/explain"]["parameters"]}
    assert list(explain)[-1] == "target" and explain["target"]["parameter_has_default"]
    assert explain["target"]["python_type"]["type"] == "str"
    params = named["/faithfulness"]["parameters"]
    assert [p["parameter_name"] for p in params] == [
        "image", "method", "target", "model", "layer", "head", "head_fusion", "discard_ratio"]
    assert not params[0]["parameter_has_default"] and all(p["parameter_has_default"] for p in params[1:])
    assert not {"/compare", "/show_faithfulness", "/faith_clear_photo"} & set(named)


# --- /faithfulness --------------------------------------------------------------------------------------------


FAITH_CASES = {  # method -> (the endpoint's settings, the same settings in the library's terms)
    "relevance": ({"target": "Trouser"}, {"target": "Trouser"}),
    "gradient_rollout": ({"discard_ratio": 0.5}, {"discard_ratio": 0.5}),
    "rollout": ({"head_fusion": "max", "discard_ratio": 0.8}, {"head_fusion": "max", "discard_ratio": 0.8}),
    "attention": ({"layer": 3, "head": "2"}, {"layer": 2, "head": 1}),
    "libra_fullgrad": ({"target": "Trouser"}, {"target": "Trouser"}),
}


@pytest.mark.parametrize("method", list(FAITH_CASES))
def test_faithfulness_is_the_librarys_score_of_the_same_map(served, bundled, method):
    from gradio_client import handle_file

    endpoint, library = FAITH_CASES[method]
    got = served["client"].predict(image=handle_file(SNEAKER), method=method, api_name="/faithfulness", **endpoint)
    want = bundled.faithfulness(Image.open(SNEAKER), method, **library)
    assert got["model"] == BUNDLED_NAME and got["method"] == method
    assert got["target"] == want["target"] == library.get("target", "Sneaker")
    assert got["steps"] == want["steps"] == 49  # one patch per step on a 7x7 grid
    baseline = 3 + 2 * 48 * faith.RANDOM_ORDERS  # the random baseline is kept per photo and class
    assert got["forward_passes"] in (baseline + 2 * 48 + faith.SACO_GROUPS, 2 * 48 + faith.SACO_GROUPS)
    assert abs(got["saco"] - want["saco"]) <= 1e-5
    assert ("completeness" in got) == (method == "libra_fullgrad")
    if "completeness" in got:
        assert got["completeness"] == pytest.approx(want["completeness"], rel=1e-5)
    for key in ("deletion_auc", "insertion_auc"):
        assert 0 <= got[key] <= 1 and 0 <= got["random"][key] <= 1
        assert abs(got[key] - want[key]) <= 1e-5, (key, got[key], want[key])
        assert abs(got["random"][key] - want["random"][key]) <= 1e-5, key
    # The AUCs are the trapezoid rule over the curves returned beside them (numpy's, not the app's).
    x = np.array(got["curves"]["x"])
    assert x[0] == 0 and x[-1] == 1 and len(x) == 50
    for kind in ("deletion", "insertion"):
        assert abs(np.trapezoid(got["curves"][kind], x) - got[f"{kind}_auc"]) <= 1e-9


def test_faithfulness_refuses_server_paths_before_scoring(served, monkeypatch):
    url = served["url"]
    secret = served["tmp"] / "secret.png"  # a readable image outside the upload cache
    Image.open(SNEAKER).save(secret)
    clf = served["demo"].registry.get(BUNDLED_NAME)
    scored = []
    faithfulness = clf.faithfulness
    monkeypatch.setattr(clf, "faithfulness", lambda *a, **k: scored.append(a) or faithfulness(*a, **k))
    rest = ["relevance", None, None, 6, "mean", "mean", 0.9]
    cache = served["demo"].GRADIO_CACHE
    for given in ({"path": str(secret)}, {"path": str(secret), "meta": {"_type": "gradio.FileData"}},
                  {"path": f"{cache}/../../{secret.name}"}, "/etc/passwd"):
        event, out = call(url, "faithfulness", [given, *rest])
        assert event == "error" and ("Only images uploaded" in out or "could not be read" in out), out
        assert "Traceback" not in out and str(secret) not in out
    assert scored == []
    event, out = call(url, "faithfulness", [upload(url, str(secret)), *rest])  # the control: uploaded, it is scored
    assert event == "complete" and len(scored) == 1, out


def test_faithfulness_checks_its_inputs_against_the_chosen_model(served):
    url = served["url"]
    photo = upload(url, SNEAKER)
    cases = {
        "heads": (["heads", None, None, 6, "mean", "mean", 0.9], "Faithfulness scores one map"),
        "layer past the model": (["attention", None, None, 7, "mean", "mean", 0.9], "from 1 to 6 for this model"),
        "unknown class": (["relevance", "Sandals", None, 6, "mean", "mean", 0.9], "'Sandals' is not one of"),
        "unknown method": (["why", None, None, 6, "mean", "mean", 0.9], "is not a valid method"),
        "too few inputs": (["relevance"], "This endpoint takes 8 inputs"),
        "a model not on offer": (["rollout", None, "/etc", 6, "mean", "mean", 0.9], "is not one of the models this app offers"),
    }
    for case, (rest, expected) in cases.items():
        event, out = call(url, "faithfulness", [photo, *rest])
        assert event == "error" and expected in out, (case, out)
        assert len(out) < 400 and out.rstrip().endswith("."), (case, out)
    # Options the method does not read are not checked: gradio_client's default layer (the bundled model's 6) does
    # not refuse a rollout of the 2-layer fruit model.
    event, out = call(url, "faithfulness", [photo, "rollout", None, "fruit", 6, "mean", "mean", 0.9])
    assert event == "complete" and out[0]["model"] == "fruit", out


# --- the tab in a browser ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser(served):
    with chromium() as b:
        yield b


def _overlay(page, old_src: str | None = None) -> tuple[str, np.ndarray]:
    """The map's <img> src once loaded (and different from `old_src`), and its pixels as the server sent them."""
    page.wait_for_function(
        "old => { const i = document.querySelector('#overlay img'); return i && i.complete && i.naturalWidth > 0 && i.src !== old; }",
        arg=old_src, timeout=WAIT_MS,
    )
    src = page.locator("#overlay img").first.get_attribute("src")
    response = page.request.get(src)
    assert response.ok, f"GET {src}: {response.status}"
    return src, np.asarray(Image.open(io.BytesIO(response.body())).convert("RGB"), dtype=int)


def _drawn(clf, path: str, method: str, target: str) -> np.ndarray:
    """The library's map for `target`, drawn as the page draws the bundled model's (its 28 px crop enlarged)."""
    from vit_demo.ui import figures

    crop, grid_map, _, _ = clf.maps(Image.open(path), method, target)
    overlay, _, _ = figures.draw(figures.enlarge(crop), grid_map, 0.6)
    return np.asarray(overlay, dtype=int)


@pytest.mark.parametrize("size", list(SIZES))
def test_choosing_the_second_class_redraws_the_map_and_scores_it(browser, served, bundled, fruit, size):
    """Classify a sneaker, ask for relevance, choose the runner-up class: the map changes to the library's map of
    that class; "Score this map" shows both AUCs (the library's, to three decimals) and the curves; "Compare
    methods" draws and scores every method for the chosen class; another model refills the choice."""
    from playwright.sync_api import expect

    phone = size == "phone"
    context = browser.new_context(viewport=SIZES[size], is_mobile=phone, has_touch=phone)
    context.set_default_timeout(WAIT_MS)
    page = context.new_page()
    try:
        page.goto(served["url"], wait_until="domcontentloaded")
        page.locator('#photo input[data-testid="file-upload"]').set_input_files(SNEAKER)
        expect(page.locator("#label .top-class")).to_have_text("Sneaker", timeout=WAIT_MS)
        page.get_by_role("tab", name="Attention").filter(visible=True).first.click()
        src, _ = _overlay(page)
        # Rollout is the same for every class: the choice is there, filled, but disabled, and says why.
        target = page.locator("#target")
        expect(target.locator("input")).to_be_disabled()
        expect(target).to_contain_text("same for every class")
        expect(target.locator("input")).to_have_value(re.compile(r"^Sneaker \(\d+\.\d%\)$"))
        _shot(page, f"explain-{size}-0-rollout.png")

        page.locator("#method label", has_text="Relevance (Chefer et al. 2021)").click()
        expect(page.locator("#map-class")).to_contain_text("This map explains the class Sneaker", timeout=WAIT_MS)
        src, first = _overlay(page, src)
        assert np.abs(first - _drawn(bundled, SNEAKER, "relevance", "Sneaker")).max() <= 1
        expect(target.locator("input")).to_be_enabled()
        _shot(page, f"explain-{size}-1-relevance.png")

        (_, _), (second, p2) = bundled.predict(Image.open(SNEAKER), k=2)
        target.locator("input").click()
        options = page.get_by_role("option")
        expect(options).to_have_count(5)
        options.filter(has_text=second).first.click()
        expect(page.locator("#map-class")).to_contain_text(f"This map explains the class {second}", timeout=WAIT_MS)
        src, changed = _overlay(page, src)
        assert mean_difference(first, changed) > 2, "the map did not change with the class"
        assert np.abs(changed - _drawn(bundled, SNEAKER, "relevance", second)).max() <= 1
        _shot(page, f"explain-{size}-2-second-class.png")

        want = bundled.faithfulness(Image.open(SNEAKER), "relevance", target=second)
        page.locator("#faith-btn").click()
        scores = page.locator("#faith-scores")
        expect(scores).to_contain_text(f"Deletion AUC {want['deletion_auc']:.3f}", timeout=WAIT_MS)
        expect(scores).to_contain_text(f"Insertion AUC {want['insertion_auc']:.3f}")
        expect(scores).to_contain_text(f"random order {want['random']['deletion_auc']:.3f}")
        expect(scores).to_contain_text("Lower is better")
        expect(scores).to_contain_text("Higher is better")
        expect(page.locator("#faith-plot")).to_be_visible()
        expect(page.locator("#faith-plot svg").first).to_be_visible()
        page.locator("#faith-plot").scroll_into_view_if_needed()
        _shot(page, f"explain-{size}-3-scored.png")

        # Another class empties the score: it belonged to the old map.
        target.locator("input").click()
        page.get_by_role("option").filter(has_text="Sneaker").first.click()
        expect(scores).to_have_text("", timeout=WAIT_MS)
        expect(page.locator("#faith-plot")).to_be_hidden()

        # A class-agnostic method keeps the chosen class for later, but names the model's answer as its class.
        target.locator("input").click()
        page.get_by_role("option").filter(has_text=second).first.click()
        expect(page.locator("#map-class")).to_contain_text(f"This map explains the class {second}", timeout=WAIT_MS)
        page.locator("#method label", has_text="Attention rollout").click()
        expect(page.locator("#map-class")).to_contain_text("The model's answer: Sneaker", timeout=WAIT_MS)
        expect(target.locator("input")).to_have_value(re.compile(rf"^{second} \("))
        expect(target.locator("input")).to_be_disabled()

        page.locator("#compare").get_by_text("Compare methods").click()
        page.locator("#compare-btn").click()
        table = page.locator("#compare-table")
        expect(table).to_contain_text("random order", timeout=WAIT_MS)
        expect(table).to_contain_text(f"Scored for the class {second}")
        expect(page.locator("#compare-maps img")).to_have_count(len(COMPARED), timeout=WAIT_MS)
        want = bundled.faithfulness(Image.open(SNEAKER), "gradient_rollout", target=second, discard_ratio=0.9)
        expect(table).to_contain_text(f"{want['deletion_auc']:.3f}")
        page.locator("#compare-maps").scroll_into_view_if_needed()
        _shot(page, f"explain-{size}-4-compare.png")

        # Another model: the class choice is refilled with its top classes, its top one selected.
        page.locator("#model input").click()
        page.get_by_role("option", name="fruit", exact=True).click()
        top = fruit.predict(Image.open(SNEAKER), k=5)
        expect(target.locator("input")).to_have_value(re.compile(rf"^{top[0][0]} \("), timeout=WAIT_MS)
        expect(page.locator("#map-class")).to_contain_text(f"The model's answer: {top[0][0]}")
        page.locator("#method label", has_text="Relevance (Chefer et al. 2021)").click()
        expect(page.locator("#map-class")).to_contain_text(f"This map explains the class {top[0][0]}", timeout=WAIT_MS)
        target.locator("input").click()
        expect(page.get_by_role("option")).to_have_text([re.compile(rf"^\W*{re.escape(label)} \(") for label, _ in top])
    finally:
        context.close()


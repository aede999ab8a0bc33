"""Every input after the image, checked by the app itself against the chosen model, and refusals in one sentence.

The page's components pass their values through unchecked (`Lenient`), so that a raw API call meets the same
checks as the page, against the model it names rather than the default model's size, and never Gradio's
generic "Error". A refusal is one sentence for the visitor and one line in the log; the log is rate-limited,
so a flood of bad requests cannot grow it without bound.

Text that comes from a checkpoint or a visitor (class names, model names, folder names, targets) meets Markdown
or HTML only through `text`, which makes every character that either could read as markup an HTML entity: it
shows as itself, never as a tag, an image, a link or a table's cell border. Refusals are shown by the page as
HTML too, so `refusal` escapes the characters that start markup there.
"""

from __future__ import annotations

import html
import logging
import math
import re

import gradio as gr

log = logging.getLogger("vit_demo.ui")

ECHO_CHARS = 60  # a visitor's text is quoted back at most this long
MAX_NAME_CHARS = 200  # longer model names are refused without being looked up


def short(value, limit: int = ECHO_CHARS) -> str:
    """`value` as text, cut to `limit` characters, for quoting back in a message or a log line."""
    text = value if isinstance(value, str) else repr(value)
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def log_refusal(message: str) -> None:
    """One line per refusal, cut short; how many lines reach the log is `fair.LogLimit`'s policy (per kind and in
    all, a minute), the same for every line the server writes."""
    log.info("refused: %s", short(message, 300))


_MARKUP = re.compile(r"[^\w\s]|_")  # every ASCII and Unicode punctuation or symbol character, and "_"


def text(value) -> str:
    """Untrusted text (a class name, model or folder name, a target) made safe to put into Markdown or HTML: every
    character other than letters, digits and spaces becomes a numeric entity, and line breaks become spaces, so
    that it is shown as written and never read as markup (no tags, images, links, emphasis or table cells).

    Args:
        value: the text (anything else is shown as its repr).
    Returns:
        the same text, for a gr.Markdown or gr.HTML value.
    """
    value = value if isinstance(value, str) else repr(value)
    return _MARKUP.sub(lambda m: f"&#{ord(m.group())};", " ".join(value.split()))


def refusal(message: str) -> gr.Error:
    """A visitor's error: logged in one line, returned to be raised. The page shows it as HTML: `<` and `&` in the
    names it quotes are shown as written."""
    log_refusal(message)
    return gr.Error(html.escape(message, quote=False), print_exception=False)


def current_client() -> str | None:
    """Who sent the request being served (its session, else its address); None outside a request."""
    from gradio.context import LocalContext

    request = LocalContext.request.get(None)
    if request is None:
        return None
    session = getattr(request, "session_hash", None)
    host = getattr(getattr(request, "client", None), "host", None)
    return session or host


def model_name(value) -> str:
    """A model name as the API received it: text of a sane length."""
    if value is None:
        return ""
    if not isinstance(value, str):
        raise refusal("The model must be given as its name in text, such as 'google/vit-base-patch16-224'.")
    if len(value) > MAX_NAME_CHARS:
        raise refusal(f"The model name '{short(value)}' is too long to be one of this app's models: pick one from the list.")
    return value


def choice(value, options, what: str):
    """One of `options` (values), or a sentence that lists them."""
    if isinstance(value, (str, int, float)) and not isinstance(value, bool) and value in options:
        return value
    listed = ", ".join(str(o) for o in options)
    raise refusal(f"'{short(value)}' is not a valid {what}: use one of {listed}.")


def whole(value, low: int, high: int, what: str) -> int:
    """A whole number in [low, high], given as a number or as text."""
    number = _number(value)
    if number is None or not math.isfinite(number) or number != int(number):
        raise refusal(f"The {what} must be a whole number from {low} to {high}, not '{short(value)}'.")
    if not low <= number <= high:
        raise refusal(f"The {what} must be from {low} to {high} for this model, not {short(f'{number:g}', 20)}.")
    return int(number)


def fraction(value, low: float, high: float, what: str) -> float:
    """A finite number in [low, high]."""
    number = _number(value)
    if number is None or not math.isfinite(number) or not low <= number <= high:
        raise refusal(f"The {what} must be a number from {low:g} to {high:g}, not '{short(value)}'.")
    return float(number)


def _number(value) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str) and len(value) < 40:
        try:
            return float(value)
        except ValueError:
            return None
    return None


class Lenient:
    """Mixin for input components: the value reaches the function as sent, to be checked there (see module doc)."""

    def preprocess(self, payload):
        return payload


class Slider(Lenient, gr.Slider):
    def get_block_name(self) -> str:
        return "slider"


class Dropdown(Lenient, gr.Dropdown):
    def get_block_name(self) -> str:
        return "dropdown"


class Radio(Lenient, gr.Radio):
    def get_block_name(self) -> str:
        return "radio"


def translate(error: Exception, inputs: list, got: int) -> gr.Error:
    """A failure of Gradio's own input handling (before any function runs) -> one sentence for the caller.

    Args:
        error: what Gradio raised.
        inputs: the event's input components.
        got: how many input values the request carried.
    """
    from gradio.exceptions import InvalidPathError

    if isinstance(error, gr.Error):  # a refusal from an input component, logged where it was raised
        return gr.Error(short(error.message, 300), print_exception=False)
    names = ", ".join(getattr(c, "label", None) or type(c).__name__ for c in inputs)
    if got < len(inputs):
        return refusal(
            f"This endpoint takes {len(inputs)} inputs ({names}) and the request sent {got}: send every input "
            "(gradio_client fills in the defaults)."
        )
    if isinstance(error, InvalidPathError):
        return refusal("Only images uploaded to this app can be used: upload the file first (gradio_client: handle_file).")
    if any(isinstance(c, gr.Dataset) for c in inputs):  # the examples' event, given an index that is not one
        return refusal("There is no such example: pick one of the examples on the page.")
    # Whatever else Gradio could not read is the request's doing: one sentence and one (rate-limited) line, naming
    # the error's type, never a traceback a flood could multiply.
    cause = error.__cause__ or error
    log_refusal(f"unreadable input ({type(cause).__name__}: {short(str(cause), 120)})")
    return gr.Error(
        "An input of this request could not be read: send the image as an uploaded file (gradio_client: handle_file) "
        "and the other inputs as plain numbers or text.", print_exception=False
    )

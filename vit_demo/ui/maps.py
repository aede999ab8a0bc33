"""What a request for a map asks, checked: the method, the options it reads, and the class to explain.

Shared by the Attention tab's map, its faithfulness score and the comparison of methods, so that `/explain`,
`/faithfulness` and the page refuse the same inputs with the same sentences. Only the options a method reads
are checked (explain.OPTIONS), so a layer left at another model's default does not refuse a rollout.

Every map's explicit attention is counted in one budget (`attending`), as decodes are in the decode budget: the
maps of a large model wait for room rather than exhaust memory together.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

from ..checkpoint_checks import ATTENTION_BUDGET_BYTES, attention_bytes
from ..classifier import Classifier
from ..explain import HEAD_FUSIONS, METHODS, OPTIONS
from . import checks, fair
from .common import Shared, need
from .guard import DecodeBudget

MAX_LABEL_CHARS = 300  # longer class names are refused without being looked up
ATTENTION = DecodeBudget(ATTENTION_BUDGET_BYTES)  # the attention memory of every map being computed (README)
NOT_TEXT = "The class to explain must be given as its label in text, such as 'Sandal', or left empty for the top class."


@dataclass
class MapRequest:
    """A checked request: the photo's path (admitted by the guard), the model, and the map it asks for."""

    path: str
    clf: Classifier
    method: str
    options: dict  # the options `method` reads, in Classifier.maps's terms (layers and heads counted from 0)
    target: int | None  # None: the top class


def target_class(clf: Classifier, value) -> int | None:
    """The class a request names (a label, as the model spells it or in any case), or None for the top class.

    An empty value means the top class. Anything else that is not one of the model's classes is refused in one
    sentence that quotes it cut short (the library's own message would quote it whole).
    """
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if not isinstance(value, str):
        raise checks.refusal(NOT_TEXT)
    if len(value) <= MAX_LABEL_CHARS:
        try:
            return clf.target_index(value)
        except ValueError:
            pass
    raise checks.refusal(
        f"'{checks.short(value)}' is not one of this model's {len(clf.labels):,} classes: give a label as /classify "
        "names it, or leave the class empty for the top one."
    )


def map_options(clf: Classifier, method: str, layer, head, head_fusion, discard_ratio) -> dict:
    """The options `method` reads, checked against `clf`; layer and head come counted from 1 (None or "" for
    the last layer, "mean" or None for the mean of the heads)."""
    c, wanted, options = clf.config, OPTIONS[method], {}
    if "layer" in wanted:
        options["layer"] = -1 if layer in (None, "") else checks.whole(layer, 1, c.depth, "layer") - 1
    if "head" in wanted:
        options["head"] = None if head in (None, "", "mean") else checks.whole(head, 1, c.num_heads, "head") - 1
    if "head_fusion" in wanted:
        options["head_fusion"] = checks.choice(head_fusion, HEAD_FUSIONS, "head fusion")
    if "discard_ratio" in wanted:
        options["discard_ratio"] = checks.fraction(discard_ratio, 0, 0.99, "discard ratio")
    return options


def parse(shared: Shared, image, method, model, layer, head, head_fusion, discard_ratio, target) -> MapRequest:
    """Every input of a map request, checked in the order a visitor would fix them: photo, method, model,
    options, class."""
    path = need(image)
    method = checks.choice(method, METHODS, "method")
    clf = shared.classifier(model)
    options = map_options(clf, method, layer, head, head_fusion, discard_ratio)
    return MapRequest(path, clf, method, options, target_class(clf, target))


def target_value(clf: Classifier, index: int) -> str:
    """What names class `index` as a target: its label, or its index in text where an earlier class has the
    same label (ImageNet has two "crane"s)."""
    label = clf.labels[index]
    return label if clf.target_index(label) == index else str(index)


@contextlib.contextmanager
def attending(clf: Classifier):
    """Holds the memory one map of `clf` takes on the explicit attention path (checkpoint_checks.attention_bytes:
    copies x layers x heads x tokens² x 4 bytes) in the attention budget while the block runs; past the budget,
    a request waits for its turn. A model whose one map exceeds the whole budget was refused at load. On the CPU
    the block runs with the heavy lane's share of threads (`fair.heavy_cpu`)."""
    with ATTENTION.hold(attention_bytes(clf.config, clf.preprocessor.cfg.input_size)), fair.heavy_cpu(clf.device):
        yield

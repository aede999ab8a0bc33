"""The bundled model: training runs end to end, and the shipped checkpoint is accurate and loads in transformers."""

import json
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch

from conftest import ROOT, assert_close
from vit_demo import load_classifier
from vit_demo.registry import BUNDLED
from vit_demo import VisionTransformer
from vit_demo.train import CLASSES, DATA_DIR, TrainConfig, augment, check, forward_train, load_split, model_config, normalize, random_erase

if not (DATA_DIR / "t10k-images-idx3-ubyte.gz").exists():
    pytest.fail(f"Fashion-MNIST is missing from {DATA_DIR}: apt-get install dataset-fashion-mnist", pytrace=False)


def test_short_training_run_end_to_end(tmp_path):
    """`python -m vit_demo train` on 3,000 images: the loss falls, and the folder loads in vit_demo and transformers."""
    out = tmp_path / "fm"
    cmd = [sys.executable, "-m", "vit_demo", "train", "--epochs", "3", "--teacher-epochs", "0", "--subset", "3000", "--val-size", "1000",
           "--embed-dim", "32", "--depth", "2", "--num-heads", "2", "--mlp-dim", "64", "--lr", "0.003", "--out", str(out)]
    run = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=240)
    assert run.returncode == 0, run.stderr[-2000:]
    losses = [float(x) for x in re.findall(r"epoch \d+: train loss ([0-9.]+)", run.stdout + run.stderr)]
    assert len(losses) == 3 and losses[-1] < losses[0] - 0.1, losses
    assert {p.name for p in out.iterdir()} >= {"config.json", "model.safetensors", "preprocessor_config.json", "README.md"}
    clf = load_classifier(out, device="cpu")
    assert clf.labels == CLASSES and clf.config.in_chans == 1
    assert "No teacher" in (out / "README.md").read_text()
    ET.fromstring((out / "training_curve.svg").read_text())  # well-formed


def test_teacher_alone_then_a_distilled_vit(tmp_path):
    """--epochs 0 trains the CNN teacher alone and saves it; --teacher then distils a ViT from it, and the card
    says so with the teacher's own accuracy."""
    base = [sys.executable, "-m", "vit_demo", "train", "--subset", "1500", "--val-size", "500", "--embed-dim", "32", "--depth", "2",
            "--num-heads", "2", "--mlp-dim", "64", "--batch-size", "128"]
    teacher = tmp_path / "teacher.pt"
    run = subprocess.run(base + ["--epochs", "0", "--teacher-epochs", "2", "--save-teacher", str(teacher)],
                         capture_output=True, text=True, cwd=ROOT, timeout=240)
    assert run.returncode == 0, run.stderr[-2000:]
    assert re.search(r"teacher test accuracy: 0\.\d+; saved to", run.stdout) and teacher.exists(), run.stdout[-500:]
    out = tmp_path / "fm"
    run = subprocess.run(base + ["--epochs", "1", "--teacher", str(teacher), "--out", str(out)],
                         capture_output=True, text=True, cwd=ROOT, timeout=240)
    assert run.returncode == 0, run.stderr[-2000:]
    card = (out / "README.md").read_text()
    assert "CNN teacher" in card and "2 epochs" in card and "test" in card, card
    history = json.loads((out / "training_history.json").read_text())
    assert len(history["teacher"]["val_acc"]) == 2 and 0 <= history["teacher_test_acc"] <= 1
    assert "--epochs 0 trains the teacher alone" in subprocess.run(base + ["--epochs", "0"], capture_output=True,
                                                                   text=True, cwd=ROOT, timeout=120).stderr
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    for bad in (garbage, tmp_path / "missing.pt"):
        run = subprocess.run(base + ["--epochs", "1", "--teacher", str(bad), "--out", str(tmp_path / "bad")],
                             capture_output=True, text=True, cwd=ROOT, timeout=120)
        assert run.returncode != 0 and "is not a teacher saved by --save-teacher" in run.stderr and "Traceback" not in run.stderr, run.stderr


@pytest.mark.parametrize("bad, words", [
    ({"batch_size": 0}, "--batch-size must be at least 1"), ({"minutes": -1.0}, "--minutes must be a non-negative"),
    ({"random_erasing": 2.0}, "--random-erasing must be from 0 to 1"), ({"lr": float("nan")}, "--lr must be a positive"),
    ({"lr": 0.0}, "--lr must be a positive"), ({"embed_dim": 30}, "multiple of --num-heads"),
    ({"patch_size": 5}, "--patch-size must divide"), ({"val_size": 60_000}, "--val-size must leave"),
    ({"drop_path": 1.0}, "--drop-path must be from 0 to 0.99"), ({"teacher_epochs": -1}, "--teacher-epochs must be at least 0"),
])
def test_settings_that_cannot_train_are_refused_in_a_sentence(bad, words):
    assert check(TrainConfig()) is None
    why = check(TrainConfig(**bad))
    assert why and words in why and why.endswith("."), why
    run = subprocess.run([sys.executable, "-m", "vit_demo", "train", f"--{next(iter(bad)).replace('_', '-')}",
                          str(next(iter(bad.values())))], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert run.returncode == 2 and words in run.stderr and "Traceback" not in run.stderr, run.stderr


def test_training_forward_is_the_models_forward_without_drop_path():
    """forward_train unrolls Block.forward to add stochastic depth: with none, it is the model's forward, exactly;
    with it, the answer changes from draw to draw."""
    torch.manual_seed(0)
    model = VisionTransformer(model_config(TrainConfig(embed_dim=32, depth=3, num_heads=2, mlp_dim=64))).eval()
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(forward_train(model, x, 0.0), model(x))
        first, second = forward_train(model, x, 0.5), forward_train(model, x, 0.5)
    assert not torch.equal(first, model(x)) and not torch.equal(first, second)


def test_random_erasing_covers_2_to_33_percent_with_noise():
    g = torch.Generator().manual_seed(0)
    x = torch.full((400, 1, 28, 28), 7.0)
    assert torch.equal(random_erase(x, 0.0, g), x)
    erased = random_erase(x, 1.0, g) != 7.0  # noise is never exactly 7
    share = erased.float().mean((1, 2, 3))
    assert share.min() >= 0.01 and share.max() <= 0.36, (share.min(), share.max())  # 2-33%, rounded to whole pixels
    for m in erased[:50, 0]:  # one rectangle: the rows and columns it touches make up all of it
        rows, cols = m.any(1), m.any(0)
        assert m.sum() == rows.sum() * cols.sum()
    half = (random_erase(x, 0.5, g) != 7.0).flatten(1).any(1).float().mean()
    assert 0.4 < half < 0.6, half


def test_shifts_and_flips_keep_the_image():
    g = torch.Generator().manual_seed(0)
    x = torch.zeros(64, 1, 28, 28, dtype=torch.uint8)
    x[:, :, 10:18, 6:12] = 200  # an off-centre block: a shift of up to 2 px and a flip keep all of it
    y = augment(x, g)
    assert y.shape == x.shape and (y == 200).flatten(1).sum(1).eq(48).all()
    assert len({tuple(m.nonzero()[0].tolist()) for m in y[:, 0]}) > 5, "no two images moved differently"


@pytest.fixture(scope="module")
def bundled():
    assert (Path(BUNDLED) / "model.safetensors").exists(), f"the bundled model is missing from {BUNDLED}"
    return load_classifier(BUNDLED, device="cpu")


def test_bundled_model_is_small_and_documented(bundled):
    size = sum(f.stat().st_size for f in Path(BUNDLED).iterdir())
    assert size <= 10 * 1024 * 1024, f"{size / 1e6:.1f} MB"
    card = (Path(BUNDLED) / "README.md").read_text()
    assert card.startswith("---\n") and "license: mit" in card and "Test accuracy" in card


def _card_accuracy() -> float:
    card = (Path(BUNDLED) / "README.md").read_text()
    return float(re.search(r"type: accuracy, value: ([0-9.]+)", card).group(1))


def test_bundled_model_test_accuracy(bundled):
    """All 10,000 test images through the served path (PIL image -> preprocess -> model) reproduce the
    test accuracy that the model card states."""
    from PIL import Image

    images, labels = load_split(DATA_DIR, "t10k")
    x = torch.cat([bundled.preprocess(Image.fromarray(im[0].numpy())) for im in images])
    assert_close(x[:100], normalize(images[:100]), 1e-5, "served preprocessing vs training normalisation")
    with torch.inference_mode():
        pred = torch.cat([bundled.model(x[i : i + 1000]).argmax(-1) for i in range(0, len(x), 1000)])
    acc = (pred == labels).float().mean().item()
    print(f"bundled model test accuracy: {acc:.4f}")
    assert abs(acc - _card_accuracy()) < 5e-4, f"test accuracy {acc:.4f}, the card says {_card_accuracy():.4f}"
    assert acc >= 0.85, f"test accuracy {acc:.4f}"


def test_bundled_model_loads_in_transformers_with_same_logits(bundled):
    from transformers import ViTForImageClassification

    ref = ViTForImageClassification.from_pretrained(BUNDLED).eval()
    x = normalize(load_split(DATA_DIR, "t10k")[0][:16])
    with torch.no_grad():
        assert_close(bundled.model(x), ref(pixel_values=x).logits, 1e-4, "transformers vs vit_demo")
    assert [ref.config.id2label[i] for i in range(10)] == CLASSES


def test_photo_is_made_light_on_dark(bundled):
    """A dark object on a light ground (a photo) is inverted, as Fashion-MNIST objects are light on black."""
    from PIL import Image, ImageDraw

    photo = Image.new("RGB", (300, 200), "white")
    ImageDraw.Draw(photo).rectangle((100, 40, 200, 160), fill="black")
    crop = bundled.preprocessor.crop(photo)  # uint8 (1, 28, 28)
    assert crop.shape == (1, 28, 28)
    assert crop[0, 14, 14] > 200 and crop[0, 1, 1] < 30

"""What someone trying vit-demo for the first time meets: the command line's sentences, a single weights file, the
bundled model offered where the Hub is out of reach, training that leaves the bundled model alone, and
percentages that do not contradict each other."""

from __future__ import annotations

import pytest

from conftest import EXAMPLES, ROOT
from vit_demo.__main__ import main

BUNDLED = "vit_demo/weights/vit-fashion-mnist"
TROUSER = str(EXAMPLES / "fashion-mnist-trouser-2.png")


def cli(capsys, *args) -> tuple[int, str, str]:
    """`python -m vit_demo ARGS` in this process: (exit code, stdout, stderr)."""
    code = 0
    try:
        main(list(args))
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
        if isinstance(e.code, str):
            print(e.code, file=__import__("sys").stderr)
    out, err = capsys.readouterr()
    return code, out, err


def test_a_single_weights_file_is_read_with_the_config_beside_it(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    code, out, err = cli(capsys, "explain", TROUSER, "--model", f"{BUNDLED}/model.safetensors", "--out", str(tmp_path / "map.png"))
    assert code == 0, err
    first = out.splitlines()[0]
    assert first.startswith("rollout map (the same for every class); top class 'Trouser' (")  # not "top class the class"
    code, out, err = cli(capsys, "explain", TROUSER, "--model", BUNDLED, "--method", "relevance", "--target", "Dress",
                         "--out", str(tmp_path / "d.png"))
    assert code == 0 and out.startswith("relevance map of the class 'Dress' ("), out + err


def test_a_lone_file_named_otherwise_still_needs_its_config(capsys, tmp_path):
    lone = tmp_path / "fashion.safetensors"  # not a Hub file name: what lies beside it is not read
    lone.write_bytes((ROOT / BUNDLED / "model.safetensors").read_bytes())
    (tmp_path / "config.json").write_bytes((ROOT / BUNDLED / "config.json").read_bytes())
    code, _, err = cli(capsys, "predict", TROUSER, "--model", str(lone))
    assert code != 0 and "has transformers weights but no config.json" in err


def test_offline_the_error_names_the_bundled_model(capsys, offline_hub, monkeypatch):
    monkeypatch.chdir(ROOT)
    code, _, err = cli(capsys, "predict", TROUSER, "--model", "google/vit-base-patch16-224")
    line = err.strip().splitlines()[-1]
    assert code != 0 and line.startswith("error: google/vit-base-patch16-224 is not in the local Hugging Face cache")
    assert line.endswith(f"Without the Hub, the bundled Fashion-MNIST model works: --model {BUNDLED}")
    code, out, err = cli(capsys, "predict", TROUSER, "--model", BUNDLED, "--top-k", "1")
    assert code == 0 and "Trouser" in out, err


def test_train_writes_beside_the_bundled_model_not_over_it(capsys):
    from vit_demo.train import main as train_main

    with pytest.raises(SystemExit) as done:
        train_main(["--help"])
    assert done.value.code == 0
    assert "default: vit-fashion-mnist in the current folder" in " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize("p, text", [
    (0.00996, "1.0%"), (0.0104, "1.0%"), (0.00994, "0.99%"), (0.0999, "10.0%"), (0.0009996, "0.10%"),
    (0.00000999, "0.0010%"),
])
def test_percentages_round_the_same_way_either_side_of_one_percent(p, text):
    from vit_demo.ui.classify import percent

    assert percent(p) == text

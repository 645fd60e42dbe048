"""bnfold.train: data split, deterministic training, both exporters, the CLI command.

The torch-free tests (data, npz, import hygiene, the missing-extra error) always run;
the rest are marked ``train`` and skip where torch is not installed.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import onnx
import pytest
from typer.testing import CliRunner

from bnfold.cli import app
from bnfold.train import INSTALL_HINT
from bnfold.train import data as D
from bnfold.train import export as E


def _need_torch():
    return pytest.importorskip("torch", reason="needs the [train] extra (torch)")


# --------------------------------------------------------------------------- torch-free


def test_digits_split_is_fixed_and_stratified():
    a, b = D.load_digits_split(), D.load_digits_split()
    assert a.x_train.shape == (1797 - D.TEST_SIZE, 64) and a.x_test.shape == (D.TEST_SIZE, 64)
    assert np.array_equal(a.x_test, b.x_test) and np.array_equal(a.y_test, b.y_test)
    counts = np.bincount(a.y_test, minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37  # stratified: 360 / 10 per class
    assert a.x_train.dtype == np.float32 and a.x_train.max() == 16.0


def test_layouts_reshape_the_same_pixels():
    x = D.load_digits_split().x_test[:5]
    img = D.as_layout(x, "image")
    assert img.shape == (5, 1, 8, 8) and np.allclose(img.reshape(5, 64) * 16, x)
    assert np.array_equal(D.as_layout(x, "flat_raw"), x)
    seq = D.as_layout(x, "sequence")  # (N, features=columns, time=rows)
    assert seq.shape == (5, 8, 8) and np.array_equal(seq[:, :, 3], img[:, 0, 3, :])
    clip = D.as_layout(x, "clip")
    assert clip.shape == (5, 1, D.CLIP_FRAMES, 8, 8)
    assert np.array_equal(clip[:, 0, 0], img[:, 0])
    assert np.array_equal(clip[:, 0, 2, :, 2:], img[:, 0, :, :6]) and not clip[:, 0, 2, :, :2].any()
    with pytest.raises(ValueError):
        D.as_layout(x, "nope")


def test_write_npz_is_byte_reproducible_and_loadable(tmp_path):
    arrays = {"input": np.arange(12, dtype=np.float32).reshape(3, 4)}
    E.write_npz(tmp_path / "a.npz", arrays)
    E.write_npz(tmp_path / "b.npz", arrays)
    assert (tmp_path / "a.npz").read_bytes() == (tmp_path / "b.npz").read_bytes()
    loaded = E.load_npz(tmp_path / "a.npz")
    assert list(loaded) == ["input"] and np.array_equal(loaded["input"], arrays["input"])


def test_importing_bnfold_and_help_do_not_import_torch():
    code = textwrap.dedent("""
        import sys
        import bnfold, bnfold.cli, bnfold.train, bnfold.train.zoo, bnfold.train.export, bnfold.train.data
        from typer.testing import CliRunner
        for args in (["--help"], ["train", "--help"]):
            assert CliRunner().invoke(bnfold.cli.app, args).exit_code == 0, args
        assert "torch" not in sys.modules, "torch was imported"
    """)
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_train_without_torch_exits_2_with_one_line(tmp_path):
    code = textwrap.dedent(f"""
        import sys
        sys.modules["torch"] = None  # what an environment without the extra looks like to import
        sys.argv = ["bnfold", "train", "--out", {str(tmp_path / "zoo")!r}]
        from bnfold.cli import main
        main()
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and INSTALL_HINT in lines[0] and "torch" in lines[0], proc.stderr
    assert not (tmp_path / "zoo").exists()


def test_unknown_only_name_is_a_usage_error(tmp_path):
    _need_torch()
    result = CliRunner().invoke(app, ["train", "--out", str(tmp_path), "--only", "no-such-model"])
    assert result.exit_code == 2
    assert not (tmp_path / "MANIFEST.json").exists()


# --------------------------------------------------------------------------- with torch


@pytest.mark.train
def test_train_a_few_steps_and_export_with_both_exporters(tmp_path):
    torch = _need_torch()
    from bnfold.train.fit import predict
    from bnfold.train.nets import count_bn
    from bnfold.train.zoo import JOBS_BY_NAME, train_job

    digits = D.load_digits_split()
    net = train_job(JOBS_BY_NAME["cnn"], digits, max_steps=5)
    assert not net.training
    bn = next(m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert int(bn.num_batches_tracked) == 5 and not torch.all(bn.running_mean == 0)

    x = D.as_layout(digits.x_test[:7], net.INPUT_LAYOUT)
    expected = predict(net, x)
    example = torch.from_numpy(D.as_layout(digits.x_train[:4], net.INPUT_LAYOUT))
    for exporter, opset in (("torchscript", 13), ("dynamo", 18)):
        path = tmp_path / f"{exporter}.onnx"
        E.export(net, example, path, exporter=exporter, opset=opset)
        onnx.checker.check_model(str(path), full_check=True)
        info = E.describe(path)
        assert info["opset"] == opset
        assert info["bn_count"] == count_bn(net) == 5
        assert info["bn_training_mode_attr"] == info["bn_with_extra_outputs"] == 0
        assert info["inputs"]["input"][0] == E.BATCH_DIM
        for batch in (1, 7):  # the batch axis is dynamic
            (out,) = E.run_onnx(path, {"input": x[:batch]})
            np.testing.assert_allclose(out, expected[:batch], rtol=1e-4, atol=1e-5)


@pytest.mark.train
def test_training_is_deterministic():
    _need_torch()
    from bnfold.train.zoo import JOBS_BY_NAME, train_job

    digits = D.load_digits_split()
    a = train_job(JOBS_BY_NAME["mlp"], digits, max_steps=8).state_dict()
    b = train_job(JOBS_BY_NAME["mlp"], digits, max_steps=8).state_dict()
    assert a.keys() == b.keys() and all(bool((a[k] == b[k]).all()) for k in a)


@pytest.mark.train
def test_training_mode_export_is_what_inspect_rejects(tmp_path):
    torch = _need_torch()
    from bnfold.audit import inspect
    from bnfold.train.zoo import JOBS_BY_NAME, train_job

    digits = D.load_digits_split()
    net = train_job(JOBS_BY_NAME["seq1d"], digits, max_steps=3)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    example = torch.from_numpy(D.as_layout(digits.x_train[:4], net.INPUT_LAYOUT))
    for opset, attr, extra in ((13, 0, 2), (17, 2, 2)):
        path = tmp_path / f"train{opset}.onnx"
        E.export(net, example, path, exporter="torchscript", opset=opset, training_mode=True)
        info = E.describe(path)
        assert (info["bn_training_mode_attr"], info["bn_with_extra_outputs"]) == (attr, extra)
        assert all(f.problems == ["training-mode"] for f in inspect(path))
    # exporting in training mode ran a forward pass, but on a copy: the net is untouched
    assert not net.training
    assert all(bool((before[k] == v).all()) for k, v in net.state_dict().items())


@pytest.mark.train
def test_cli_train_only_updates_the_manifest(tmp_path):
    _need_torch()
    runner = CliRunner()
    result = runner.invoke(app, ["train", "--out", str(tmp_path), "--only", "seq1d_ts13", "--epochs", "1"])
    assert result.exit_code == 0, result.output
    assert "seq1d" in result.output and "accuracy" in result.output
    # off a terminal (CliRunner), one plain line per model, no table
    assert any(line.startswith("seq1d_ts13.onnx  torchscript  opset 13") for line in result.output.splitlines())
    assert not any(character in result.output for character in "─━┃│┏"), result.output
    result = runner.invoke(app, ["train", "--out", str(tmp_path), "--only", "mlp_ts13", "--epochs", "1", "-q"])
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "MANIFEST.json").read_text())
    assert [m["file"] for m in manifest["models"]] == ["mlp_ts13.onnx", "seq1d_ts13.onnx"]
    for m in manifest["models"]:
        assert E.sha256(tmp_path / m["file"]) == m["sha256"]
        assert m["epochs"] == 1 and m["exporter"] == "torchscript" and m["opset"] == 13
        assert 0.2 < m["test_accuracy"] <= 1.0  # one epoch is already well above chance (0.1)
        feeds = E.load_npz(tmp_path / m["inputs"])
        labels = E.load_npz(tmp_path / m["labels"])["labels"]
        (out,) = E.run_onnx(tmp_path / m["file"], feeds)
        assert np.mean(out.argmax(1) == labels) == pytest.approx(m["test_accuracy"], abs=1e-6)

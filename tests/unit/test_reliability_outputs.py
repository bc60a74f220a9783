"""--output never destroys what is there: regular files are replaced atomically, a symlink's target is
(the link stays), FIFOs and character devices are written into, `-` is stdout, an input is refused.
In-process, through the commands and fileio."""

from __future__ import annotations

import contextlib
import io
import os
import stat
import threading

import pytest
import torch
from PIL import Image

from dist_cnn.commands import main
from dist_cnn.errors import UserError
from dist_cnn.fileio import check_output, write_output

from .test_reliability_security import model_file

pytestmark = pytest.mark.filterwarnings("ignore:Unable to enable fault handler")


def run(argv):
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        code = main(argv)
    return code, [ln for ln in err.getvalue().splitlines() if ln.strip()]


def read_fifo(path, into: list):
    with open(path, "rb") as f:
        into.append(f.read())


def test_a_fifo_is_written_into_not_replaced(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    got: list = []
    reader = threading.Thread(target=read_fifo, args=(fifo, got))
    reader.start()
    write_output(str(fifo), b"rows\n")
    reader.join(timeout=30)
    assert got == [b"rows\n"] and stat.S_ISFIFO(os.lstat(fifo).st_mode)


def test_a_symlink_keeps_its_link_and_its_target_is_replaced(tmp_path):
    (tmp_path / "real.csv").write_text("old")
    (tmp_path / "link.csv").symlink_to("real.csv")
    write_output(str(tmp_path / "link.csv"), b"new")
    assert os.path.islink(tmp_path / "link.csv") and (tmp_path / "real.csv").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.csv", "real.csv"]


def test_a_symlink_to_a_character_device_stays(tmp_path):
    (tmp_path / "null").symlink_to("/dev/null")
    check_output(str(tmp_path / "null"))
    write_output(str(tmp_path / "null"), b"x" * 100)
    assert os.readlink(tmp_path / "null") == "/dev/null" and stat.S_ISCHR(os.stat("/dev/null").st_mode)


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full")
def test_a_full_device_is_an_oserror_and_stays_a_device(tmp_path):
    (tmp_path / "full").symlink_to("/dev/full")
    with pytest.raises(OSError):
        write_output(str(tmp_path / "full"), b"x" * 100)
    assert stat.S_ISCHR(os.stat("/dev/full").st_mode) and os.path.islink(tmp_path / "full")


def test_dash_is_stdout(capfd):
    write_output("-", b"to stdout\n")
    assert capfd.readouterr().out == "to stdout\n"


def test_an_output_that_is_an_input_is_refused(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"x")
    (tmp_path / "alias.jpg").symlink_to("a.jpg")
    for out in (tmp_path / "a.jpg", tmp_path / "alias.jpg"):
        with pytest.raises(UserError, match="is one of the inputs"):
            check_output(str(out), [str(tmp_path / "a.jpg")])
    with pytest.raises(UserError, match="is a directory"):
        check_output(str(tmp_path))


@pytest.fixture
def model_and_image(tmp_path):
    path = model_file(tmp_path / "model.pt", "seed")
    Image.new("RGB", (32, 32), (200, 10, 10)).save(tmp_path / "img.png")
    return path, tmp_path / "img.png"


@pytest.mark.parametrize("command", ["predict", "eval", "export"])
def test_every_command_refuses_an_input_as_its_output(model_and_image, command):
    model, image = model_and_image
    before = {p: p.read_bytes() for p in (model, image)}
    argv = {
        "predict": ["predict", "--model-file", str(model), str(image), "--output", str(image)],
        "eval": ["eval", "--checkpoint", str(model), "--output", str(model)],
        "export": ["export", str(model), "--format", "safetensors", "--images", str(image), "--output", str(image)],
    }[command]
    code, lines = run(argv)
    assert code == 2 and len(lines) == 1 and "is one of the inputs" in lines[0], lines
    assert {p: p.read_bytes() for p in before} == before


def test_predict_into_a_folder_input_refuses_an_image_of_it(model_and_image):
    model, image = model_and_image
    code, lines = run(["predict", "--model-file", str(model), str(image.parent), "--output", str(image)])
    assert code == 2 and "is one of the inputs" in lines[0]


def test_predict_and_export_write_through_a_symlink_to_a_fifo(model_and_image, tmp_path):
    model, image = model_and_image
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    (tmp_path / "link").symlink_to(fifo)
    for argv in (
        ["predict", "--model-file", str(model), str(image), "--format", "csv", "--output", str(tmp_path / "link")],
        ["export", str(model), "--format", "safetensors", "--images", str(image), "--output", str(tmp_path / "link")],
    ):
        got: list = []
        reader = threading.Thread(target=read_fifo, args=(fifo, got))
        reader.start()
        code, lines = run(argv)
        reader.join(timeout=30)
        assert code == 0, lines
        assert got and got[0] and stat.S_ISFIFO(os.lstat(fifo).st_mode) and os.path.islink(tmp_path / "link")


def test_export_to_stdout(model_and_image, capfdbinary):
    from safetensors.torch import load

    model, image = model_and_image
    assert main(["export", str(model), "--format", "safetensors", "--images", str(image), "--output", "-"]) == 0
    captured = capfdbinary.readouterr()
    assert b"exported seed" in captured.err
    assert set(load(captured.out)) == set(torch.load(model, weights_only=True)["model"])


def test_eval_output_dash_is_json_on_stdout(model_and_image, capfd):
    model, _ = model_and_image
    import json

    code = main(["eval", "--checkpoint", str(model), "--output", "-"])
    captured = capfd.readouterr()
    assert code == 0, captured.err
    assert json.loads(captured.out)["model"] == "seed" and "test accuracy" in captured.err

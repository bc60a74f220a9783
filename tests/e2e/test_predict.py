"""`dist-cnn predict`: the run's preprocessing, the same top-1 as `dist-cnn eval`, bad files, torchrun."""

from __future__ import annotations

import csv
import io
import json
import random

import pytest
import torch
from torchvision.io import decode_image
from torchvision.transforms import v2

from dist_cnn import cli
from dist_cnn.inference.predictor import InferenceModel, load_image
from tests.support.common import ROOT, clean_env, run_py

# cli.main's torchrun error handler cannot install its fault handler under pytest's captured stderr
pytestmark = pytest.mark.filterwarnings("ignore:Unable to enable fault handler")
PREDICT = ["-m", "dist_cnn.cli", "predict"]


def _confusion(rows, classes):
    m = torch.zeros(len(classes), len(classes), dtype=torch.int64)
    for r in rows:
        true = classes.index(r["file"].split("/")[-2])
        m[true, r["predictions"][0]["index"]] += 1
    return m.tolist()


def test_predict_matches_eval_and_reports_bad_files(seed_run, image_folder, tmp_path):
    test_files = sorted(str(p) for p in (image_folder / "test").rglob("*") if p.is_file())
    p = run_py(
        [
            *PREDICT,
            "--model-file",
            seed_run / "model.pt",
            image_folder / "test",
            image_folder / "bad.jpg",
            "--format",
            "json",
            "--top-k",
            "2",
        ]
    )
    assert p.returncode == 1, p.stderr
    errors = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 2 and "bad.jpg" in errors[0] and "1 of" in errors[1], p.stderr
    assert "Traceback" not in p.stderr
    rows = [json.loads(line) for line in p.stdout.splitlines()]
    assert sorted(r["file"] for r in rows) == test_files  # every readable file once, the bad one not
    assert all(
        len(r["predictions"]) == 2 and r["predictions"][0]["probability"] >= r["predictions"][1]["probability"]
        for r in rows
    )

    # dist-cnn eval decodes the same folder through the training data path: same top-1 for every image
    run_py([*PREDICT[:2], "eval", "--checkpoint", seed_run / "model.pt", "--output", tmp_path / "eval.json"], check=0)
    ev = json.loads((tmp_path / "eval.json").read_text())
    assert ev["test_total"] == len(rows)
    assert _confusion(rows, ev["classes"]) == ev["confusion_matrix"]
    assert ev["test_accuracy"] > 0.6  # a model that learned something, so the comparison means something
    assert not (seed_run / "tensorboard").exists()  # TensorBoard is off unless asked for


def test_predict_checkpoint_csv_and_skip_bad_images(seed_run, image_folder, capsys, tmp_path):
    best = seed_run / "checkpoints" / "best.pt"
    one = image_folder / "test" / "stripes" / "000.jpg"
    out = tmp_path / "pred.csv"
    code = cli.main(
        [
            "predict",
            "--model-file",
            str(best),
            str(image_folder / "bad.jpg"),
            str(one),
            "--format",
            "csv",
            "--top-k",
            "9",
            "--skip-bad-images",
            "--output",
            str(out),
        ]
    )
    err = capsys.readouterr().err
    assert code == 0 and "warning: skipped" in err and "bad.jpg" in err
    rows = list(csv.reader(io.StringIO(out.read_text())))
    assert rows[0] == ["file", "class_1", "probability_1", "class_2", "probability_2", "class_3", "probability_3"]
    assert len(rows) == 2 and rows[1][0] == str(one)
    assert abs(sum(float(v) for v in rows[1][2::2]) - 1) < 1e-4  # top-k clipped to the 3 classes: all of them


def test_predict_torchrun_two_ranks_each_file_once_in_order(seed_run, image_folder, capsys):
    files = sorted(str(p) for p in (image_folder / "test").rglob("*.jpg"))
    random.Random(0).shuffle(files)
    order = files[:7] + [str(image_folder / "bad.jpg")] + files[7:]  # the bad file lands on rank 0's half
    args = [
        "--model-file",
        str(seed_run / "model.pt"),
        *order,
        "--format",
        "json",
        "--batch-size",
        "4",
        "--skip-bad-images",
    ]
    assert cli.main(["predict", *args]) == 0
    single = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    p = run_py(
        ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "dist_cnn.cli", "predict", *args],
        env=clean_env(OMP_NUM_THREADS="1"),
        cwd=ROOT,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    rows = [json.loads(line) for line in p.stdout.splitlines()]
    assert [r["file"] for r in rows] == files  # input order, each file exactly once, written by rank 0 alone
    assert "world size 2" in p.stderr and p.stderr.count("warning: skipped") == 1
    for a, b in zip(rows, single):
        assert [x["index"] for x in a["predictions"]] == [x["index"] for x in b["predictions"]]
        assert max(abs(x["probability"] - y["probability"]) for x, y in zip(a["predictions"], b["predictions"])) < 1e-5


def test_predict_bad_input_is_one_line_exit_2(seed_run, image_folder, tmp_path, capsys):
    model = str(seed_run / "model.pt")
    cases = [
        (["--model-file", model, str(tmp_path / "missing.jpg")], "no such file"),
        (["--model-file", model, str(tmp_path)], "no image files"),
        (["--model-file", str(image_folder / "bad.jpg"), str(image_folder / "test")], "weights_only"),
        (["--model-file", model, str(image_folder / "test"), "--top-k", "0"], "--top-k"),
        (["--model-file", model, str(image_folder / "test"), "--format", "xml"], "--format"),
        (["--model-file", model, str(image_folder / "test"), "--output", str(tmp_path / "no" / "x.csv")], "--output"),
        ([str(image_folder / "test")], "--model-file"),
    ]
    for args, words in cases:
        assert cli.main(["predict", *args]) == 2, args
        out = capsys.readouterr()
        assert out.out == "" and len(out.err.strip().splitlines()) == 1 and words in out.err, (args, out.err)


def test_streamed_runs_resize_and_center_crop(image_folder):
    """A run whose recipe has --eval-resize center-crop evaluated Resize(floor(size / ratio)) +
    CenterCrop(size): predict prepares files the same way (torchvision's transforms are the reference).
    Runs from before the recipe options followed their loader: streamed ones cropped, others stretched."""
    path = image_folder / "test" / "squares" / "wide.jpg"  # 40 wide, 48 high
    reference = v2.Compose([v2.Resize(36, antialias=True), v2.CenterCrop(32)])(decode_image(str(path)))

    def model(data: dict, loader: str = "") -> InferenceModel:
        return InferenceModel(
            torch.nn.Identity(), "seed", ["a", "b"], 3, 32, [0.5] * 3, [0.5] * 3, {"data": data}, loader
        )

    assert torch.equal(
        load_image(str(path), model({"eval_resize": "center-crop", "eval_crop_ratio": 0.875})), reference
    )
    assert torch.equal(load_image(str(path), model({"eval_crop_ratio": 0.875}, "stream")), reference)
    stretched = v2.Resize((32, 32), antialias=True)(decode_image(str(path)))
    assert torch.equal(load_image(str(path), model({"eval_crop_ratio": 0.875}, "device")), stretched)
    assert torch.equal(load_image(str(path), model({})), stretched)

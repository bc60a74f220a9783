"""`--dataset shards` end to end: the stream loader's guarantees on shards (same batches, exact resume,
world-size equivalence, exact evaluation), HTTP and S3 servers on loopback, bad input as one line."""

import json

import pytest

from tests.e2e.test_stream import FAIL, history, launcher, make_folder, max_diff
from tests.support.common import clean_env, read_summary, run_py, torchrun, train
from tests.support.shard_servers import S3_ENV, http_server, s3_server, upload

COMMON = [
    "--image-size",
    "24",
    "--batch-size",
    "16",
    "--epochs",
    "2",
    "--wandb",
    "disabled",
    "--no-progress",
    "--precision",
    "fp32",
    "--workers",
    "1",
    "--log-every",
    "1",
    "--checkpoint-every-steps",
    "2",
    "--flip",
]


def args(data_dir, *extra):
    return ["--dataset", "shards", "--data-dir", data_dir, *COMMON, *map(str, extra)]


def shard(src, out, *extra, check=0):
    return run_py(["-m", "dist_cnn.cli", "shard", src, "--out", out, "--shard-size", "24KB", *extra], check=check)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("shards") / "imgs")


@pytest.fixture(scope="module")
def shards(folder):
    out = folder.parent / "shards"
    p = shard(folder, out)
    assert "train: 48 samples in" in p.stdout
    return out


@pytest.mark.slow
def test_global_order_gives_the_stream_loaders_batches(tmp_path, folder, shards):
    train(args(shards, "--out", tmp_path / "shards", "--epochs", "1"), check=0)
    stream = ["--dataset", "imagefolder", "--loader", "stream", "--data-dir", folder, *COMMON]
    train([*stream, "--out", tmp_path / "stream", "--epochs", "1"], check=0)
    assert max_diff(tmp_path / "shards", tmp_path / "stream") == 0
    assert history(tmp_path / "shards") == history(tmp_path / "stream")


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [1, 2])
def test_exact_resume_mid_epoch(tmp_path, shards, nproc):
    a = lambda out, *x: args(shards, "--shuffle", "shards:2", "--out", tmp_path / out, *x)  # noqa: E731
    launcher(nproc)(a("straight"), check=0)
    env = clean_env(FAIL_RANK=str(nproc - 1), FAIL_STEP="5")  # epoch 2, step 2 of 3
    cmd = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", FAIL] if nproc > 1 else [FAIL]
    crashed = run_py([*cmd, *a("resumed")], env=env)
    assert crashed.returncode != 0 and "injected failure" in crashed.stdout + crashed.stderr
    p = launcher(nproc)(a("resumed", "--resume", "auto"), check=0)
    assert "resumed from" in p.stdout and "step-00000004.pt" in p.stdout
    assert max_diff(tmp_path / "straight", tmp_path / "resumed") <= 1e-6
    assert history(tmp_path / "straight") == history(tmp_path / "resumed")
    s = read_summary(tmp_path / "resumed")
    assert s["steps"] == 6 and s["loader"] == "stream" and s["skipped_images"] == 0 and s["test_total"] == 20


@pytest.mark.slow
def test_world_size_2_matches_world_size_1(tmp_path, shards):
    a = lambda out: args(shards, "--shuffle", "shards:3", "--out", tmp_path / out, "--max-steps", "4")  # noqa: E731
    train(a("ws1"), check=0)
    torchrun(2, a("ws2"), check=0)
    assert max_diff(tmp_path / "ws1", tmp_path / "ws2") <= 1e-5
    assert read_summary(tmp_path / "ws1")["test_correct"] == read_summary(tmp_path / "ws2")["test_correct"]


@pytest.mark.slow
def test_exact_eval_world_size_3_on_100_images(tmp_path):
    folder = make_folder(tmp_path / "imgs", n_train=48, n_test=100, classes=3)
    shard(folder, tmp_path / "ds")
    out = tmp_path / "ws3"
    torchrun(3, args(tmp_path / "ds", "--batch-size", "15", "--max-steps", "2", "--out", out), check=0)
    s = read_summary(out)
    assert s["world_size"] == 3 and s["test_total"] == 100  # 100 = 3 * 33 + 1
    run_py(["-m", "dist_cnn.cli", "eval", "--checkpoint", out / "model.pt", "--output", tmp_path / "e.json"], check=0)
    single = json.loads((tmp_path / "e.json").read_text())
    assert single["world_size"] == 1 and single["test_total"] == 100
    assert single["test_correct"] == s["test_correct"] and single["per_class_accuracy"] == s["per_class_accuracy"]


@pytest.mark.slow
def test_corrupt_image_in_a_shard_stops_with_one_line_or_is_skipped_and_counted(tmp_path):
    folder = make_folder(tmp_path / "imgs")
    good = (folder / "train" / "c1" / "0001.jpg").read_bytes()
    (folder / "train" / "c1" / "0003.jpg").write_bytes(good[: len(good) // 2])  # folder position 25
    shard(folder, tmp_path / "ds")
    p = train(args(tmp_path / "ds", "--out", tmp_path / "stop", "--epochs", "1"))
    err = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(err) == 1 and "Traceback" not in p.stderr, p.stderr
    assert "shard-" in err[0] and ".tar:000000025" in err[0] and "--skip-bad-images" in err[0], err
    p = train(args(tmp_path / "ds", "--out", tmp_path / "skip", "--epochs", "1", "--skip-bad-images"), check=0)
    assert read_summary(tmp_path / "skip")["skipped_images"] == 1 and ".tar:000000025" in p.stdout


def test_bad_input_is_one_line_before_training(tmp_path, shards):
    import shutil

    ds = shutil.copytree(shards, tmp_path / "ds")
    (ds / "classes.txt").write_text("only\n")
    (ds / "index.json").unlink()  # rebuilt from the shards, whose labels 0..1 exceed one class
    p = train(args(ds, "--out", tmp_path / "run"))
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "outside the 1 classes" in p.stderr, p.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.slow
def test_http_and_s3_train_one_epoch(tmp_path, shards):
    with http_server(shards.parent) as base:
        train(args(f"{base}/{shards.name}", "--out", tmp_path / "http", "--epochs", "1"), check=0)
    with s3_server() as endpoint:
        upload(endpoint, "bucket", shards, "sets/ds")
        opts = json.dumps({"endpoint_url": endpoint})
        run = args("s3://bucket/sets/ds", "--storage-options", opts, "--out", tmp_path / "s3", "--epochs", "1")
        train([*run, "--shuffle", "shards:2", "--shard-cache", tmp_path / "cache"], env=clean_env(**S3_ENV), check=0)
    for run in ("http", "s3"):
        s = read_summary(tmp_path / run)
        assert s["steps"] == 3 and s["test_total"] == 20 and s["skipped_images"] == 0
    assert list((tmp_path / "cache").glob("*.tar"))

"""Sharded datasets (`--dataset shards`): the figures, side by side, from one run.

On a generated folder of JPEGs (300-500 px, made once and cached) written as shards with `dist-cnn
shard`, at --image-size 224 (RandomResizedCrop + flip), 2 DataLoader workers, 1 rank:

1. opens       files opened in one epoch by the 2 workers' readers: the folder (one per image), shards
               with the global permutation and with --shuffle shards:K (counted by the reader over the
               epoch's real access pattern: batch b goes to worker b % 2, as DataLoader deals them),
               and whole-shard fetches through a bounded --shard-cache.
2. throughput  training-pipeline images/s: the stream loader on the folder, shards on the local disk
               (global and shards:K), over HTTP (a range-capable http.server on loopback; python -m
               http.server with --shard-cache) and over S3 (moto's server on loopback, s3fs client).
               Cold: every file the run reads (images or shards) is dropped from the page cache
               first (posix_fadvise DONTNEED), the shard cache emptied. Configurations are
               interleaved, `--rounds` times; medians reported.
3. rss         the index's memory per sample, and the RSS of a process holding a loaded index of
               10^4 .. 10^6 samples.

    python benchmarks/shards_pipeline.py [--images 20000] [--data-dir DIR] [--rounds 3] [--steps 12]
                                         [--only opens,throughput,rss] [--json out.json]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's benchmarks and dist_cnn

from benchmarks.common import Stamp, child_env, free_port, parser, pipeline_rate  # noqa: E402
from benchmarks.images import cache_dir, folder_stats, make_folder, stream_pipeline  # noqa: E402
from dist_cnn.config import DataConfig  # noqa: E402
from dist_cnn.data.loader import Augment, epoch_plan  # noqa: E402
from dist_cnn.data.shards import index as ix  # noqa: E402
from dist_cnn.data.shards.dataset import open_split_readers  # noqa: E402
from dist_cnn.data.shards.order import window_order  # noqa: E402
from dist_cnn.data.shards.writer import write_shards  # noqa: E402
from tests.support.shard_servers import S3_ENV  # noqa: E402

WORKERS, BATCH, WINDOW = 2, 32, 4


def make_shards(folder: Path, dest: Path, shard_size: int) -> Path:
    if not (dest / "index.json").is_file():
        write_shards(str(folder), str(dest), shard_size=shard_size)
    return dest


def drop_page_cache(root: Path) -> None:
    """Evicts every file under root from the page cache (no root privileges needed)."""
    for p in root.rglob("*"):
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


# ----------------------------------------------------------------------------- 1. opens


def epoch_opens(data_dir: str, shuffle: str, cache: str = "", cache_size: str = "20GB") -> dict:
    cfg = DataConfig(
        dataset="shards", data_dir=data_dir, shuffle=shuffle, shard_cache=cache, shard_cache_size=cache_size
    )
    _, train, _ = open_split_readers(cfg, timeout=60)
    n = len(train)
    if shuffle == "global":
        perm = epoch_plan(n, 0, 0, Augment())["perm"]
    else:
        perm = window_order(train.index.shard, train.num_shards, int(shuffle.split(":")[1]), 0, 0)
    workers = [pickle_copy(train) for _ in range(WORKERS)]
    steps = n // BATCH
    for b in range(steps):
        reader = workers[b % WORKERS]
        for i in perm[b * BATCH : (b + 1) * BATCH].tolist():
            reader.read(i)
    return {
        "shards": train.num_shards,
        "opens": sum(w.opens for w in workers),
        "fetches": sum(w.cache.fetched for w in workers) if cache else 0,
        "samples": steps * BATCH,
    }


def pickle_copy(obj):
    import pickle

    return pickle.loads(pickle.dumps(obj))


def opens(folder: Path, shards: Path, shard_bytes: int) -> dict:
    n = len(list((folder / "train").rglob("*.jpg")))
    out = {"stream (folder)": {"opens": n // BATCH * BATCH, "note": "one open per image, by construction"}}
    out["shards, global"] = epoch_opens(str(shards), "global")
    out[f"shards, shards:{WINDOW}"] = epoch_opens(str(shards), f"shards:{WINDOW}")
    for shuffle in ("global", f"shards:{WINDOW}"):
        cache = tempfile.mkdtemp(prefix="shard-cache-")
        out[f"shards via cache of {WINDOW + 2} shards, {shuffle}"] = epoch_opens(
            str(shards), shuffle, cache, str((WINDOW + 2) * shard_bytes)
        )
        shutil.rmtree(cache)
    return out


# ----------------------------------------------------------------------------- 2. throughput


def shards_rate(cfg: DataConfig, steps: int) -> dict:
    pipe = stream_pipeline(cfg, BATCH, measure=False)
    res = pipeline_rate(pipe.epoch(0), pipe.loader, 2, steps, BATCH)
    del pipe
    gc.collect()
    return res


def serve(kind: str, root: Path) -> tuple[subprocess.Popen, str]:
    """A server in its own process (not competing with this one for the GIL): its base URL."""
    port = free_port()
    env = child_env(**S3_ENV)
    code = {
        "http-range": "import functools, sys; from http.server import ThreadingHTTPServer; "
        "from tests.support.shard_servers import RangeHandler; "
        f"ThreadingHTTPServer(('127.0.0.1', {port}), functools.partial(RangeHandler, directory={str(root)!r}))"
        ".serve_forever()",
        "http.server": f"import sys; sys.argv = ['http.server', '--bind', '127.0.0.1', '--directory', "
        f"{str(root)!r}, '{port}']; import runpy; runpy.run_module('http.server', run_name='__main__')",
        "s3": "from moto.server import ThreadedMotoServer; import time; "
        f"s = ThreadedMotoServer(ip_address='127.0.0.1', port={port}, verbose=False); s.start(); time.sleep(10**6)",
    }[kind]
    p = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # poll until it answers
        try:
            import urllib.request

            urllib.request.urlopen(url + "/", timeout=2)
            return p, url
        except Exception as e:
            if getattr(e, "code", None):  # an HTTP error: it is up
                return p, url
            time.sleep(0.2)
    p.kill()
    raise RuntimeError(f"{kind} server did not start")


def throughput(folder: Path, shards: Path, rounds: int, steps: int) -> dict:
    base = dict(image_size=224, train_crop="random-resized", normalize="half", workers=WORKERS, loader="stream")
    http_range, http_url = serve("http-range", shards.parent)
    plain, plain_url = serve("http.server", shards.parent)
    s3, s3_url = serve("s3", shards.parent)
    os.environ.update(S3_ENV)
    from tests.support.shard_servers import upload

    upload(s3_url, "bench", shards, "ds")
    s3_opts = json.dumps({"endpoint_url": s3_url})
    cache = Path(tempfile.mkdtemp(prefix="shard-cache-"))
    k = f"shards:{WINDOW}"
    configs = {
        "stream (folder)": dict(dataset="imagefolder", data_dir=str(folder)),
        "shards local, global": dict(dataset="shards", data_dir=str(shards)),
        f"shards local, {k}": dict(dataset="shards", data_dir=str(shards), shuffle=k),
        "HTTP range reads, global": dict(dataset="shards", data_dir=f"{http_url}/{shards.name}"),
        f"HTTP (python -m http.server) + cache, {k}": dict(
            dataset="shards", data_dir=f"{plain_url}/{shards.name}", shuffle=k, shard_cache=str(cache)
        ),
        "S3 (moto) range reads, global": dict(dataset="shards", data_dir="s3://bench/ds", storage_options=s3_opts),
        f"S3 (moto) + cache, {k}": dict(
            dataset="shards", data_dir="s3://bench/ds", storage_options=s3_opts, shuffle=k, shard_cache=str(cache)
        ),
    }
    runs: dict[str, list] = {name: [] for name in configs}
    try:
        for r in range(rounds):
            for name, c in configs.items():  # interleaved: the machine's load drifts between rounds
                drop_page_cache(folder / "train" if c["dataset"] == "imagefolder" else shards)
                shutil.rmtree(cache, ignore_errors=True)
                res = shards_rate(DataConfig(**base, **c), steps)
                runs[name].append(res)
                print(f"  round {r + 1} {name}: {res['images_per_sec']:.0f} img/s", flush=True)
    finally:
        for p in (http_range, plain, s3):
            p.kill()
        shutil.rmtree(cache, ignore_errors=True)
    return {
        name: {
            "images_per_sec": statistics.median(x["images_per_sec"] for x in rs),
            "cpu_ms_per_image": statistics.median(x["cpu_ms_per_image"] for x in rs),
            "all_images_per_sec": [round(x["images_per_sec"], 1) for x in rs],
        }
        for name, rs in runs.items()
    }


# ----------------------------------------------------------------------------- 3. rss


def rss_kb() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def rss_child(path: str) -> None:
    """Run in a fresh process: its RSS before and after loading one index (the file's bytes freed)."""
    before = rss_kb()
    folder = Path(path)
    index = ix.from_files(lambda n: (folder / n).read_bytes() if (folder / n).exists() else None, path, ["train"])
    gc.collect()
    s = index.splits["train"]
    after = rss_kb()
    print(json.dumps({"samples": len(s), "index_bytes": s.nbytes(), "rss_kb": after, "rss_growth_kb": after - before}))


def rss(sizes=(10_000, 100_000, 1_000_000)) -> list[dict]:
    rows = []
    for n in sizes:
        d = Path(tempfile.mkdtemp(prefix="shard-index-"))
        rng = np.random.default_rng(0)
        per = 1250  # ImageNet at 512 MB shards: ~1,250 images a shard
        split = ix.SplitIndex(
            [f"train/shard-{i:06d}.tar" for i in range(-(-n // per))],
            [512 * 10**6] * (-(-n // per)),
            np.array([f"{i:09d}".encode() for i in range(n)], dtype=np.bytes_),
            (np.arange(n) // per).astype(np.int32),
            rng.integers(0, 5 * 10**8, n).astype(np.int64),
            rng.integers(10**4, 10**6, n).astype(np.int64),
            rng.integers(0, 2**32, n, dtype=np.uint64).astype(np.uint32),
            rng.integers(0, 1000, n).astype(np.int64),
        )
        for name, data in ix.to_files(ix.Index([str(c) for c in range(1000)], {"train": split})).items():
            (d / name).write_bytes(data)
        p = subprocess.run(
            [sys.executable, __file__, "--rss-child", str(d)],
            capture_output=True,
            text=True,
            env=child_env(),
            check=True,
        )
        row = json.loads(p.stdout.strip().splitlines()[-1])
        row["index_bytes_per_sample"] = row["index_bytes"] / n
        rows.append(row)
        shutil.rmtree(d)
    return rows


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = parser(__doc__, "where the generated folder and its shards are kept (made once)", data_aliases=("--cache",))
    ap.add_argument("--images", type=int, default=20000, help="training images in the generated folder")
    ap.add_argument("--shard-size", type=int, default=16 * 10**6, help="bytes a shard (default 16 MB)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=12, help="batches of 32 timed per configuration and round")
    ap.add_argument("--only", default="opens,throughput,rss")
    ap.add_argument("--rss-child", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.rss_child:
        rss_child(a.rss_child)
        return 0
    stamp, only, out = Stamp(), set(a.only.split(",")), {}
    cache = cache_dir(a.data_dir)
    folder = cache / f"folder-{a.images}"
    if only & {"opens", "throughput"}:
        make_folder(folder, a.images, max(a.images // 20, 100), (300, 500))
        shards = make_shards(folder, cache / f"shards-{a.images}-{a.shard_size}", a.shard_size)
        out["data"] = {"folder": folder_stats(folder), "shards": len(list((shards / "train").glob("*.tar")))}
        print(out["data"], flush=True)
    if "opens" in only:
        out["opens"] = opens(folder, shards, a.shard_size)
        print(json.dumps(out["opens"], indent=1), flush=True)
    if "throughput" in only:
        out["throughput"] = throughput(folder, shards, a.rounds, a.steps)
        print(json.dumps(out["throughput"], indent=1), flush=True)
    if "rss" in only:
        out["rss"] = rss()
        print(json.dumps(out["rss"], indent=1), flush=True)
    stamp.write(a.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

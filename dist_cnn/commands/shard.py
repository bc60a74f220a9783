"""`dist-cnn shard SRC --out DIR`: an image folder -> tar shards (webdataset layout) and their index,
for `--dataset shards --data-dir DIR` (a path, or the same files served over HTTP or S3)."""

from __future__ import annotations

from dist_cnn import config as config_mod
from dist_cnn.data.shards.cache import parse_size
from dist_cnn.data.shards.writer import write_shards
from dist_cnn.errors import UserError


def shard_parser():
    p = config_mod.ArgumentParser(
        prog="dist-cnn shard",
        description="Write an image folder (train/<class>/*, TEST_SPLIT/<class>/*) as tar shards in the "
        "webdataset layout (KEY.jpg + KEY.cls) with an index of every member's offset, size, checksum and "
        "label. Train from them with --dataset shards --data-dir DIR (a path, http(s):// or s3:// prefix).",
    )
    p.add_argument("src", metavar="SRC", help="the image folder (holding train/ and the test split)")
    p.add_argument("--out", required=True, metavar="DIR", help="a new (or empty) folder for the shards")
    p.add_argument(
        "--shard-size",
        default="512MB",
        metavar="SIZE",
        help="start a new shard once one reaches SIZE (512MB, 1GiB, ...; default: 512MB)",
    )
    p.add_argument(
        "--max-side",
        type=int,
        default=0,
        metavar="N",
        help="re-encode (JPEG, quality 95) only the images whose longer side exceeds N px, down to N; "
        "0 keeps every file's bytes (default: 0)",
    )
    p.add_argument("--test-split", default="test", help="the test split's folder beside train/ (default: test)")
    p.add_argument(
        "--skip-bad-images",
        action="store_true",
        help="leave out files that are not images (listed) instead of stopping (default: False)",
    )
    p.add_argument("--seed", type=int, default=0, help="the training samples' order across shards (default: 0)")
    return p


def main_shard(argv) -> int:
    args = shard_parser().parse_args(argv)
    if args.max_side < 0:
        raise UserError(f"--max-side must be >= 0, got {args.max_side}")
    size = parse_size(args.shard_size, "--shard-size")
    reports = write_shards(
        args.src,
        args.out,
        shard_size=size,
        max_side=args.max_side,
        test_split=args.test_split,
        skip_bad=args.skip_bad_images,
        seed=args.seed,
    )
    for split, r in reports.items():
        print(
            f"{split}: {r.samples} samples in {r.shards} shard(s), {r.shard_bytes / 1e6:.1f} MB "
            f"(images {r.source_bytes / 1e6:.1f} MB, {r.reencoded} re-encoded)"
            + (f", {len(r.skipped)} unreadable file(s) left out: {', '.join(r.skipped[:5])}" if r.skipped else "")
        )
    print(f"wrote {args.out}; train with --dataset shards --data-dir {args.out}")
    return 0

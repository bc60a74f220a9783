"""Sharded datasets: tar shards in the webdataset layout (KEY.jpg + KEY.cls) with an index of every
member's offset, read by offset from a local folder, an http(s):// prefix or an s3:// bucket.

- writer: an image folder -> shards and their index (`dist-cnn shard`);
- index: the index format, built from any shards in the layout, and its staleness checks;
- storage: the three kinds of location, through fsspec, with bounded timeouts;
- cache: a bounded local cache of whole shards;
- reader: one split as a streamed sample source (len, read(i) -> bytes, label(i), name(i));
- order: --shuffle shards:K, the epoch order read K shards at a time;
- dataset: opening a dataset for training or evaluation (rank 0 indexes, every rank reads).
"""

"""Real servers on loopback for sharded datasets: HTTP with range requests, and moto's S3."""

from __future__ import annotations

import contextlib
import functools
import io
import os
import re
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from tests.support.common import free_port

S3_ENV = {  # moto accepts any credentials; the clients read them from the usual variables
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


class RangeHandler(SimpleHTTPRequestHandler):
    """http.server's file handler plus `Range: bytes=a-b` (206), which it lacks; counts requests."""

    ranges = True

    def send_head(self):
        match = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range") or "")
        path = self.translate_path(self.path)
        if not (self.ranges and match) or os.path.isdir(path):
            return super().send_head()
        try:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                start = int(match[1])
                end = min(int(match[2]) if match[2] else size - 1, size - 1)
                f.seek(start)
                body = f.read(max(0, end - start + 1))
        except OSError:
            self.send_error(404)
            return None
        self.send_response(206)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        return io.BytesIO(body)

    def log_message(self, *args):  # quiet
        pass


@contextlib.contextmanager
def http_server(root: Path, ranges: bool = True):
    """Serves root on 127.0.0.1 from a thread; yields the base URL."""
    handler = type("Handler", (RangeHandler,), {"ranges": ranges})
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@contextlib.contextmanager
def s3_server():
    """moto's S3 in server mode on loopback; yields its endpoint URL (credentials in S3_ENV)."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


def upload(endpoint: str, bucket: str, root: Path, prefix: str) -> None:
    """Every file under root to s3://bucket/prefix/..., with a real boto3 client."""
    import boto3

    s3 = boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name=S3_ENV["AWS_DEFAULT_REGION"],
        aws_access_key_id=S3_ENV["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=S3_ENV["AWS_SECRET_ACCESS_KEY"],
    )
    s3.create_bucket(Bucket=bucket)
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        s3.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(root).as_posix()}")

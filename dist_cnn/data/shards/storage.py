"""Where shards live: a local folder, an http(s):// prefix or an s3://bucket/prefix.

Remote locations are read through fsspec (aiohttp for HTTP, s3fs/botocore for S3: credentials from
the usual AWS variables, endpoint and the rest from --storage-options). Every request has a
connect/read timeout of --timeout seconds, and the first request of a run is bounded as a whole, so
an unreachable server or bucket is one line naming the URL, never a hang. A Storage is pickled into
DataLoader workers: each process opens its own filesystem client.
"""

from __future__ import annotations

import json
import os
import threading

from dist_cnn.errors import UserError, one_line


def storage_options(text: str) -> dict:
    """--storage-options: a JSON object of fsspec options (endpoint_url, anon, client_kwargs, ...)."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except ValueError as e:
        raise UserError(f"--storage-options: not JSON ({e})") from None
    if not isinstance(value, dict):
        raise UserError(f"--storage-options: expected a JSON object such as '{{\"endpoint_url\": \"...\"}}', got {text!r}")
    return value


def kind_of(url: str) -> str:
    if url.startswith("s3://"):
        return "s3"
    if url.startswith(("http://", "https://")):
        return "http"
    return "file"


class Storage:
    def __init__(self, url: str, options: dict | None = None, timeout: float = 60.0):
        self.kind = kind_of(url)
        self.url = os.path.normpath(url) if self.kind == "file" else url.rstrip("/")
        self.options, self.timeout = dict(options or {}), float(timeout)
        self._fs, self._pid = None, None

    def __getstate__(self):
        return {**self.__dict__, "_fs": None, "_pid": None}  # clients do not cross processes

    @property
    def local(self) -> bool:
        return self.kind == "file"

    def join(self, name: str) -> str:
        return os.path.join(self.url, name) if self.local else f"{self.url}/{name}"

    # ---- the fsspec client ---------------------------------------------------------------------
    @property
    def fs(self):
        if self._fs is None or self._pid != os.getpid():
            import fsspec

            try:
                self._fs, self._pid = fsspec.filesystem(self.kind, **self._client_options()), os.getpid()
            except ImportError as e:  # s3fs (or aiohttp) is an optional dependency
                extra = "s3" if self.kind == "s3" else "shards"
                raise UserError(f"{self.url} needs {e.name or e}: pip install 'dist_cnn[{extra}]'") from None
            except (TypeError, ValueError) as e:  # an option the client does not take
                raise UserError(f"--storage-options for {self.url}: {one_line(e)}") from None
        return self._fs

    def _client_options(self) -> dict:
        t, opts = self.timeout, dict(self.options)
        if self.kind == "http":
            import aiohttp

            client = dict(opts.pop("client_kwargs", {}))
            # per connect and per read, not in total: a 512 MB shard may take longer than t to fetch
            client.setdefault("timeout", aiohttp.ClientTimeout(total=None, sock_connect=t, sock_read=t))
            opts["client_kwargs"] = client
        elif self.kind == "s3":
            config = dict(opts.pop("config_kwargs", {}))
            config.setdefault("connect_timeout", t)
            config.setdefault("read_timeout", t)
            config.setdefault("retries", {"max_attempts": 2, "mode": "standard"})
            opts["config_kwargs"] = config
            opts.setdefault("skip_instance_cache", True)
        return opts

    def _fail(self, url: str, e: BaseException) -> UserError:
        return UserError(f"shards: cannot read {url} ({one_line(e, 200)})")

    # ---- reads ---------------------------------------------------------------------------------
    def read_range(self, name: str, start: int, size: int) -> bytes:
        url = self.join(name)
        if self.local:
            try:
                with open(url, "rb") as f:
                    return os.pread(f.fileno(), size, start)
            except OSError as e:
                raise UserError(f"shards: cannot read {url} ({e.strerror or e})") from None
        try:
            return self.fs.cat_file(url, start=start, end=start + size)
        except Exception as e:
            raise self._fail(url, e) from None

    def read_all(self, name: str) -> bytes | None:
        """A small file's bytes, or None when it does not exist."""
        url = self.join(name)
        if self.local:
            try:
                with open(url, "rb") as f:
                    return f.read()
            except FileNotFoundError:
                return None
            except OSError as e:
                raise UserError(f"shards: cannot read {url} ({e.strerror or e})") from None
        try:
            return self.fs.cat_file(url)
        except FileNotFoundError:
            return None
        except Exception as e:
            raise self._fail(url, e) from None

    def open(self, name: str):
        """A sequential binary reader (indexing a shard reads it once, front to back)."""
        url = self.join(name)
        try:
            return open(url, "rb") if self.local else self.fs.open(url, "rb", block_size=8 << 20)
        except Exception as e:
            raise self._fail(url, e) from None

    def get(self, name: str, dest: str) -> None:
        url = self.join(name)
        try:
            self.fs.get_file(url, dest)
        except Exception as e:
            raise self._fail(url, e) from None

    def sizes(self, folder: str) -> dict[str, int] | None:
        """{name relative to the root: size} of the files directly in `folder` ("" = the root), or
        None where the location cannot be listed (a web server without directory pages)."""
        url = self.join(folder) if folder else self.url
        if self.local:
            try:
                return {
                    os.path.join(folder, e.name) if folder else e.name: e.stat().st_size
                    for e in os.scandir(url)
                    if e.is_file()
                }
            except FileNotFoundError:
                return {}
            except OSError as e:
                raise UserError(f"shards: cannot list {url} ({e.strerror or e})") from None
        try:
            entries = self.fs.ls(url, detail=True)
        except FileNotFoundError:
            return {}
        except Exception as e:
            if self.kind == "http" and not _unreachable(e):
                return None
            raise self._fail(url, e) from None
        out = {}
        for entry in entries:
            if entry.get("type") == "directory":
                continue
            base = entry["name"].rstrip("/").rsplit("/", 1)[-1]
            name = f"{folder}/{base}" if folder else base
            size = entry.get("size")
            if size is None and name.endswith(".tar"):  # directory pages of web servers carry no sizes
                size = self.size(name)
            out[name] = size
        return out

    def size(self, name: str) -> int | None:
        url = self.join(name)
        try:
            if self.local:
                return os.stat(url).st_size
            return int(self.fs.info(url)["size"])
        except FileNotFoundError:
            return None
        except Exception as e:
            raise self._fail(url, e) from None

    def probe(self, fn):
        """fn() with the whole call bounded by the timeout: the first contact with a remote location."""
        if self.local:
            return fn()
        self.fs  # the client's imports and set-up are not the server's time  # noqa: B018
        box: dict = {}

        def run():
            try:
                box["value"] = fn()
            except BaseException as e:  # handed to the caller's thread
                box["error"] = e

        t = threading.Thread(target=run, daemon=True)
        t.start()
        t.join(self.timeout)
        if t.is_alive():
            raise UserError(
                f"shards: no answer from {self.url} within --timeout {self.timeout:g} s (server or bucket unreachable?)"
            )
        if "error" in box:
            raise box["error"]
        return box.get("value")


def _unreachable(e: BaseException) -> bool:
    import asyncio

    text = f"{type(e).__name__} {e}".lower()
    return isinstance(e, (OSError, asyncio.TimeoutError)) or "connect" in text or "timeout" in text

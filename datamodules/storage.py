"""Where shards live: a local folder, ``http(s)://``, ``s3://``, ``gs://`` or a ``pipe:`` command.

Metadata (``dataset.json``, the index files) is read through fsspec; tar shards are streamed through
fsspec for remote URLs (S3-compatible endpoints and credentials come from the standard environment:
``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ...; ``gs://`` needs ``gcsfs``)
and through webdataset's own ``gopen`` for ``pipe:`` commands and local files. `tar_samples` is the
pipeline stage that turns shard URLs into samples: a remote read that fails half-way (a reset
connection, a truncated body) is retried with exponential backoff up to a bounded budget, resuming
after the samples already delivered (so no sample is seen twice), then reported to the corrupt-data
handler (skipped and counted, or one line naming the shard).
"""
from __future__ import annotations

import json
import logging
import os
import posixpath
import tarfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import webdataset as wds
from webdataset.tariterators import base_plus_ext

from adapters.errors import UserError

log = logging.getLogger(__name__)

REMOTE = ("http://", "https://", "s3://", "gs://", "gcs://")
#: A fresh filesystem object per call: fsspec caches them by arguments, not by the environment that
#: configures an S3 endpoint, and a forked loader worker must not reuse its parent's connections.
_FRESH = {"skip_instance_cache": True}


def is_remote(location: str) -> bool:
    return str(location).startswith(REMOTE)


def is_url(location: str) -> bool:
    """A location read through a protocol (remote, or a ``pipe:`` command), not a local path."""
    return is_remote(location) or str(location).startswith("pipe:")


def join(root: str, name: str) -> str:
    """``root/name`` for local paths and URLs alike (an absolute ``name`` stays as it is)."""
    root = str(root)
    if is_url(name) or os.path.isabs(name) or not root:
        return name
    return posixpath.join(root, name) if is_url(root) else str(Path(root) / name)


def parent(location: str) -> str:
    location = str(location)
    return posixpath.dirname(location.rstrip("/")) if is_url(location) else str(Path(location).parent)


def exists(location: str) -> bool:
    if not is_remote(location):
        return Path(location).exists()
    import fsspec

    try:
        fs, path = fsspec.core.url_to_fs(location, **_FRESH)
        return fs.exists(path)
    except Exception:  # noqa: BLE001 - an unreachable store: the caller reports the missing manifest
        return False


def read_text(location: str) -> str:
    """The text of a local or remote file; a one-line `UserError` naming it when it cannot be read."""
    if not is_remote(location):
        try:
            return Path(location).read_text()
        except OSError as e:
            raise UserError(f"{location}: cannot read ({e.strerror})") from None
    import fsspec

    try:
        with fsspec.open(location, "rt", **_FRESH) as f:
            return f.read()
    except Exception as e:  # noqa: BLE001 - fsspec backends raise their own types
        raise UserError(f"{location}: cannot read ({type(e).__name__}: {' '.join(str(e).split())[:200]})") from None


def read_json(location: str) -> dict:
    return json.loads(read_text(location))


def upload(local: Path, location: str) -> None:
    """Copy a local file to a remote location as one object (an object store's PUT is atomic)."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(location, **_FRESH)
    fs.put_file(str(local), path)


def open_stream(url: str):
    """A binary stream of one shard: fsspec for remote URLs, webdataset's ``gopen`` otherwise."""
    if is_remote(url):
        import fsspec

        return fsspec.open(url, "rb", **_FRESH).open()
    return wds.gopen(url, "rb")


def samples_of_tar(stream) -> Iterator[dict[str, bytes]]:
    """Group a tar stream's members into samples by key (``__key__`` plus one entry per extension, no
    decoding), as webdataset does: the key is the path up to the first dot of the file name."""
    current = None
    with tarfile.open(fileobj=stream, mode="r|*") as tar:
        for member in tar:
            if not member.isreg():
                continue
            key, ext = base_plus_ext(member.name)
            if key is None:
                continue
            if current is None or current["__key__"] != key:
                if current is not None:
                    yield current
                current = {"__key__": key}
            current[ext] = tar.extractfile(member).read()
    if current is not None:
        yield current


class ShardReadError(OSError):
    """A shard that could not be read whole within the retry budget."""


def tar_samples(src, handler: Callable[[Exception], bool], retries: int = 3, backoff: float = 0.2,
                failures=None) -> Iterator[dict]:
    """Pipeline stage: shard URLs -> samples (``__key__``, ``__url__``, one entry per extension).

    A read of a remote shard that fails is retried up to ``retries`` times, waiting ``backoff``,
    ``2 backoff``, ... seconds, and continues after the samples it had already delivered. When the
    budget is spent, or at once for local files and ``pipe:`` commands, the error goes to ``handler``
    (the corrupt-data policy: skip and count, or raise). ``failures`` (a shared counter) counts the
    retried reads."""
    for shard in src:
        url = shard["url"]
        delivered, attempt = 0, 0
        while True:
            try:
                stream = open_stream(url)
                try:
                    for i, sample in enumerate(samples_of_tar(stream)):
                        if i < delivered:
                            continue  # delivered before the connection broke: not again
                        sample["__url__"] = url
                        yield sample
                        delivered += 1
                finally:
                    stream.close()
                break
            except Exception as e:  # noqa: BLE001 - network, tar and pipe errors alike
                if isinstance(e, (GeneratorExit, KeyboardInterrupt)):
                    raise
                attempt += 1
                message = f"{url}: {type(e).__name__}: {' '.join(str(e).split())[:200]}"
                if is_remote(url) and attempt <= retries:
                    if failures is not None:
                        with failures.get_lock():
                            failures.value += 1
                    log.warning("read of %s failed after %d samples (%s); retry %d of %d", url, delivered,
                                type(e).__name__, attempt, retries)
                    time.sleep(backoff * 2 ** (attempt - 1))
                    continue
                suffix = f" (after {retries} retries, {delivered} samples read)" if is_remote(url) else ""
                if handler(ShardReadError(message + suffix)):
                    break
                raise

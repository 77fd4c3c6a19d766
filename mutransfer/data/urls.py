"""Opening shards and indexes by URL: local paths, `file://`, `pipe:` commands and fsspec URLs."""

from __future__ import annotations

import os
import posixpath
from typing import IO
from urllib.parse import urlparse

import webdataset as wds


def scheme_of(url: str) -> str:
    if url.startswith("pipe:"):
        return "pipe"
    scheme = urlparse(url).scheme
    return "" if len(scheme) <= 1 else scheme  # one letter is a Windows drive, not a scheme


def fsspec_knows(scheme: str) -> bool:
    """True when fsspec has an importable implementation for this URL scheme."""
    try:
        import fsspec

        fsspec.get_filesystem_class(scheme)
    except (ImportError, ValueError):
        return False
    return True


def open_url(url: str) -> IO[bytes]:
    """Open a shard or index for binary reading.

    Local paths and file:// URLs open directly; `pipe:CMD` runs CMD in a shell and reads its stdout
    (webdataset's gopen: whoever writes the config chooses the command, so treat configs as code); other
    schemes go through fsspec when it has an implementation (s3, gcs, hf, http with aiohttp, memory, ...),
    and otherwise through webdataset's gopen (curl for http, gsutil for gs, ...).
    """
    scheme = scheme_of(url)
    if scheme in ("", "file"):  # a large buffer: tarfile reads in many small pieces
        return open(url[len("file://") :] if scheme == "file" else url, "rb", buffering=1 << 20)
    if scheme != "pipe" and fsspec_knows(scheme):
        import fsspec

        return fsspec.open(url, "rb").open()
    return wds.gopen(url, "rb")


def url_dirname(url: str) -> str:
    return posixpath.dirname(url) if scheme_of(url) else os.path.dirname(url)


def url_join(folder: str, name: str) -> str:
    return folder.rstrip("/") + "/" + name if scheme_of(folder) else os.path.join(folder, name)

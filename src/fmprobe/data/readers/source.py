"""Byte access through fsspec, so every reader works the same on local disk, memory://, s3:// or gs://.

Readers take the whole file as bytes (decoders get a ``BytesIO``), except videos, which PyAV reads through
an open file object so a clip of a long video reads only the parts it needs: no temp files, no library that
silently needs a real path, and one place that turns "missing" and "empty" into a clear ReaderError.
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import IO

from fsspec import AbstractFileSystem
from fsspec.core import url_to_fs

from fmprobe.errors import ReaderError


@dataclass(frozen=True)
class Source:
    """One file or folder to read, with the sample it belongs to (for error messages)."""

    fs: AbstractFileSystem
    path: str  # path inside fs
    url: str  # as the user wrote it (named in errors)
    sample_id: str

    @classmethod
    def from_url(cls, url: str, sample_id: str) -> "Source":
        fs, path = url_to_fs(url)
        return cls(fs, path, url, sample_id)

    @property
    def name(self) -> str:
        return posixpath.basename(self.path.rstrip("/"))

    def error(self, reason: str) -> ReaderError:
        return ReaderError(reason, sample_id=self.sample_id, path=self.url)

    def child(self, path: str) -> "Source":
        """A file inside this folder, named in errors as ``<folder url>/<file name>``."""
        return Source(self.fs, path, f"{self.url.rstrip('/')}/{posixpath.basename(path)}", self.sample_id)

    def read_bytes(self) -> bytes:
        try:
            with self.fs.open(self.path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            raise self.error("file not found") from None
        except IsADirectoryError:
            raise self.error("is a folder, expected a file") from None
        except OSError as err:
            raise self.error(f"cannot read file: {err}") from None
        if not data:
            raise self.error("file is empty (0 bytes)")
        return data

    @contextmanager
    def open(self) -> Iterator[IO[bytes]]:
        """The file opened for reading (seekable), with the errors of :meth:`read_bytes`."""
        try:
            info = self.fs.info(self.path)
            if info["type"] == "directory":
                raise self.error("is a folder, expected a file")
            if not info.get("size"):
                raise self.error("file is empty (0 bytes)")
            f = self.fs.open(self.path, "rb")
        except FileNotFoundError:
            raise self.error("file not found") from None
        except OSError as err:
            raise self.error(f"cannot read file: {err}") from None
        with f:
            yield f

    def stamp(self) -> tuple[object, ...]:
        """What changes when the file is rewritten (size, modification time, ETag...), for in-memory memos."""
        info = self.fs.info(self.path)
        return tuple(info.get(k) for k in ("size", "mtime", "ino", "ETag", "etag", "LastModified", "updated",
                                           "generation"))

    def is_dir(self) -> bool:
        return self.fs.isdir(self.path)

    def list_files(self) -> list["Source"]:
        """Files directly in this folder (not recursive), hidden files left out, sorted by name."""
        try:
            entries = self.fs.ls(self.path, detail=True)
        except FileNotFoundError:
            raise self.error("folder not found") from None
        files = [
            e["name"] for e in entries if e["type"] == "file" and not posixpath.basename(e["name"]).startswith(".")
        ]
        return [self.child(p) for p in sorted(files)]


def extension(path: str) -> str:
    """Lower-case extension, with the double ones that matter (``.nii.gz``)."""
    name = posixpath.basename(path.rstrip("/")).lower()
    if name.endswith(".nii.gz"):
        return ".nii.gz"
    return posixpath.splitext(name)[1]

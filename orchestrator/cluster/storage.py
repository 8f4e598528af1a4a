"""Grid storage: a local folder or a bucket URI (``s3://``, ``gs://``, ``file://``), through
``pyarrow.fs`` — the same file-system layer Ray Train and Tune use for their own storage.

A :class:`Location` is one folder in that storage: a file system, the path on it, and the URI
a user sees (for a bucket, the URI as given, query parameters such as ``endpoint_override``
included, so a printed location can be passed back to ``mergenet run --resume``). Ray gets
the pair ``(storage_path, storage_filesystem)`` from :meth:`Location.ray_storage`; for a local
folder that is the plain path and no file system object, exactly as before buckets worked.

Credentials are never part of a location: pyarrow resolves them in every process from that
process's environment (AWS: environment variables, ``~/.aws``, the instance profile), and a
pickled file system carries only its options (endpoint, scheme, region), not the keys.
"""
from __future__ import annotations

import posixpath
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pyarrow
import pyarrow.fs as pafs

from mergenet_core.errors import MergenetError

#: URI schemes ``storage_path`` accepts (what ``pyarrow.fs.FileSystem.from_uri`` resolves)
SCHEMES = ("s3", "gs", "gcs", "file", "hdfs", "viewfs", "abfs", "abfss")


def check_uri(value: str) -> str | None:
    """A problem with a storage path/URI's form (no I/O), or None."""
    if "://" not in value:
        return None
    scheme = value.split("://", 1)[0].lower()
    if scheme not in SCHEMES:
        return (f"unsupported scheme '{scheme}://' (use s3://, gs://, file:// or a local path; "
                f"accepted: {', '.join(SCHEMES)})")
    if not urlsplit(value).netloc and scheme not in ("file", "hdfs", "viewfs"):
        return f"'{value}' names no bucket"
    return None


def _copy(src: str, dst: str, src_fs: pafs.FileSystem, dst_fs: pafs.FileSystem) -> None:
    # uploads to S3 single-threaded, as Ray does (apache/arrow#32372: threaded S3 uploads can fail)
    pafs.copy_files(src, dst, source_filesystem=src_fs, destination_filesystem=dst_fs,
                    use_threads=not isinstance(dst_fs, pafs.S3FileSystem))


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0]


class Location:
    """One folder (or file) in grid storage."""

    __slots__ = ("fs", "path", "uri")

    def __init__(self, fs: pafs.FileSystem, path: str, uri: str):
        self.fs, self.path, self.uri = fs, path, uri

    # ------------------------------------------------------------------ construction
    @classmethod
    def parse(cls, where: str | Path) -> "Location":
        """A local path (relative to the working directory), ``file://``, or a bucket URI."""
        s = str(where)
        if "://" not in s:
            p = Path(s).expanduser().resolve()
            return cls(pafs.LocalFileSystem(), p.as_posix(), str(p))
        problem = check_uri(s)
        if problem:
            raise MergenetError(f"storage {s}: {problem}")
        try:
            fs, path = pafs.FileSystem.from_uri(s)
        except (pyarrow.ArrowException, OSError, ValueError) as e:
            raise MergenetError(f"storage {s}: {_first_line(e)}") from None
        if isinstance(fs, pafs.LocalFileSystem):  # file:///abs/path -> a plain local path
            return cls(fs, path, path)
        return cls(fs, path.rstrip("/"), s)

    @property
    def local(self) -> Path | None:
        """The folder as a local path when the storage is the local file system, else None."""
        return Path(self.path) if isinstance(self.fs, pafs.LocalFileSystem) else None

    def __truediv__(self, name: str) -> "Location":
        name = str(name).strip("/")
        if self.local is not None:
            p = (Path(self.path) / name).as_posix()
            return Location(self.fs, p, p)
        u = urlsplit(self.uri)
        path = posixpath.join(u.path or "/", name)
        return Location(self.fs, posixpath.join(self.path, name),
                        urlunsplit((u.scheme, u.netloc, path, u.query, u.fragment)))

    @property
    def name(self) -> str:
        return posixpath.basename(self.path)

    @property
    def parent(self) -> "Location":
        if self.local is not None:
            p = Path(self.path).parent.as_posix()
            return Location(self.fs, p, p)
        u = urlsplit(self.uri)
        up = posixpath.dirname(u.path.rstrip("/")).rstrip("/")
        return Location(self.fs, posixpath.dirname(self.path), urlunsplit((u.scheme, u.netloc, up, u.query, u.fragment)))

    def __str__(self) -> str:
        return self.uri

    def __repr__(self) -> str:
        return f"Location({self.uri!r})"

    def ray_storage(self) -> tuple[str, pafs.FileSystem | None]:
        """``(storage_path, storage_filesystem)`` for Ray's ``RunConfig`` / ``Tuner.restore``."""
        return (self.path, None) if self.local is not None else (self.path, self.fs)

    # ------------------------------------------------------------------ I/O
    def _io(self, what: str, fn, *args):
        try:
            return fn(*args)
        except FileNotFoundError:
            raise
        except (pyarrow.ArrowException, OSError) as e:
            raise MergenetError(f"storage {self.uri}: {what} failed: {_first_line(e)}") from None

    def info(self) -> pafs.FileInfo:
        return self._io("stat", self.fs.get_file_info, self.path)

    def exists(self) -> bool:
        return self.info().type != pafs.FileType.NotFound

    def mkdir(self) -> "Location":
        self._io("mkdir", lambda: self.fs.create_dir(self.path, recursive=True))
        return self

    def read_bytes(self) -> bytes:
        def read():
            with self.fs.open_input_stream(self.path) as f:
                return f.readall()
        return self._io("read", read)

    def read_text(self) -> str:
        return self.read_bytes().decode()

    def write_bytes(self, data: bytes) -> None:
        def write():
            if self.local is not None:
                Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            with self.fs.open_output_stream(self.path) as f:
                f.write(data)
        self._io("write", write)

    def write_text(self, text: str) -> None:
        self.write_bytes(text.encode())

    def delete(self) -> None:
        """Remove this folder (recursively) or file; nothing if it does not exist."""
        info = self.info()
        if info.type == pafs.FileType.Directory:
            self._io("delete", self.fs.delete_dir, self.path)
        elif info.type == pafs.FileType.File:
            self._io("delete", self.fs.delete_file, self.path)

    def move_to(self, dest: "Location") -> None:
        """Rename a folder (local) or copy it and delete the original (buckets have no rename)."""
        if self.local is not None:
            Path(self.path).rename(dest.path)
            return
        self.copy_from(self, dest)
        self.delete()

    @staticmethod
    def copy_from(src: "Location", dest: "Location") -> None:
        dest._io("copy", _copy, src.path, dest.path, src.fs, dest.fs)

    def upload(self, local: str | Path, names: list[str] | None = None) -> None:
        """Copy a local folder (all of it, or only ``names`` in it) or file to this location."""
        local = Path(local)
        if self.local is not None and Path(self.path) == local.resolve():
            return  # the storage is the local folder itself
        lfs = pafs.LocalFileSystem()
        if local.is_file():
            self._io("upload", _copy, local.as_posix(), self.path, lfs, self.fs)
            return
        if names is None:
            self.mkdir()
            self._io("upload", _copy, local.as_posix(), self.path, lfs, self.fs)
            return
        for n in names:
            if (local / n).is_file():
                (self / n)._io("upload", _copy, (local / n).as_posix(), (self / n).path, lfs, self.fs)

    def listdir(self, recursive: bool = False) -> list[str]:
        """Paths below this folder, relative to it (sorted); empty if it does not exist."""
        sel = pafs.FileSelector(self.path, allow_not_found=True, recursive=recursive)
        base = self.path.rstrip("/") + "/"
        return sorted(i.path[len(base):] if i.path.startswith(base) else i.path
                      for i in self._io("list", self.fs.get_file_info, sel))


def scratch_dir(*parts: str) -> Path:
    """A new private local scratch folder (``tempfile.mkdtemp``: unpredictable name, mode 700):
    where a trial writes files before they go to bucket storage. The caller removes it."""
    import re
    import tempfile

    tag = re.sub(r"[^A-Za-z0-9_.-]", "_", "-".join(parts))[:80]
    return Path(tempfile.mkdtemp(prefix=f"mergenet-{tag}-"))

"""The spool: where received instances live, byte for byte as they arrived.

Layout (DESIGN.md section 4)::

    spool/
      journal.sqlite          the journal (dicom_node.journal)
      tmp/                    instances being received; emptied at start
      <study uid>/<series uid>/<sop instance uid>.dcm

UIDs are validated (dicom_node.uids) before they name anything here. An
instance is first written to ``tmp/``, fsynced, then linked into place; the
directory entries are fsynced too, so once :meth:`Spool.commit` returns, a
power cut does not take the instance away.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import hashlib
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from .uids import validate_uid

log = logging.getLogger(__name__)

TMP_DIR = "tmp"
JOURNAL_FILE = "journal.sqlite"
INSTANCE_SUFFIX = ".dcm"
PART_SUFFIX = ".part"


class SpoolError(OSError):
    """The spool could not take an instance (disk full, I/O error, permissions)."""


def _load_sync_file_range() -> Any:
    """libc's sync_file_range (Linux), or None where it is not available."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.sync_file_range
        fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
        fn.restype = ctypes.c_int
        return fn
    except (OSError, AttributeError):
        return None


_sync_file_range = _load_sync_file_range()
SYNC_FILE_RANGE_WRITE = 2
#: Start writeback each time this much has arrived, so the fsync before
#: Success waits for the tail of the instance, not all of it.
WRITEBACK_CHUNK = 256 * 1024


class SpoolTempFile:
    """A temporary file in ``spool/tmp`` that never raises on write.

    pynetdicom writes a C-STORE data set straight to a temporary file while it
    arrives (``STORE_RECV_CHUNKED_DATASET``), from its DUL thread, where an
    exception would kill the association. This object stands in for the
    ``NamedTemporaryFile`` it uses: a write error (disk full, EIO) is
    remembered in :attr:`error`, the bytes written so far are released, and
    the rest of the data set is read off the wire and dropped, so the C-STORE
    handler can answer 0xA700 and the association lives on.

    It writes with unbuffered ``os.write`` calls: pynetdicom flushes after
    every fragment anyway, and the final fsync is the node's.
    """

    def __init__(self, directory: Path, suffix: str = PART_SUFFIX) -> None:
        fd, name = tempfile.mkstemp(dir=directory, suffix=suffix)
        self.fd: int | None = fd
        self.name = name
        self.error: OSError | None = None
        self.size = 0
        self._flushed = 0

    # pynetdicom calls ``tmp.file.flush()`` on the NamedTemporaryFile wrapper
    @property
    def file(self) -> "SpoolTempFile":
        return self

    def write(self, data: bytes) -> int:
        if self.error is not None or self.fd is None:
            return len(data)
        view = memoryview(data)
        try:
            while view:
                written = os.write(self.fd, view)
                view = view[written:]
                self.size += written
        except OSError as exc:
            self.error = exc
            self._release_space()
            return len(data)
        if _sync_file_range is not None and self.size - self._flushed >= WRITEBACK_CHUNK:
            _sync_file_range(self.fd, self._flushed, self.size - self._flushed, SYNC_FILE_RANGE_WRITE)
            self._flushed = self.size
        return len(data)

    def flush(self) -> None:
        """Nothing to flush: writes are unbuffered."""

    def fsync(self) -> None:
        if self.fd is None or self.error is not None:
            return
        try:
            os.fsync(self.fd)
        except OSError as exc:
            self.error = exc
            self._release_space()

    def _release_space(self) -> None:
        try:
            os.ftruncate(self.fd, 0)  # type: ignore[arg-type]
        except OSError:
            pass

    def close(self) -> None:
        if self.fd is not None:
            try:
                os.close(self.fd)
            except OSError:
                pass
            self.fd = None

    def discard(self) -> None:
        self.close()
        try:
            os.unlink(self.name)
        except FileNotFoundError:
            pass

    def __del__(self) -> None:
        # An association aborted mid-data set drops the message holding this
        # file: release the descriptor and the partial file. A committed
        # instance lives on under its own link in the study folder.
        try:
            self.discard()
        except Exception:
            pass

    def __enter__(self) -> "SpoolTempFile":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def fsync_dir(path: Path | str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def file_digest(path: Path | str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class Spool:
    """The on-disk store of received instances."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root).resolve()
        self.tmp = self.root / TMP_DIR
        self.journal_path = self.root / JOURNAL_FILE
        self._root_text = str(self.root)
        self._known_dirs: set[str] = set()

    def prepare(self, clean_tmp: bool = True) -> None:
        """Create the spool (owner-only permissions) and remove temp files a
        crash left behind: they were never acknowledged, so nothing is lost."""
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.tmp.mkdir(exist_ok=True, mode=0o700)
        if clean_tmp:
            removed = 0
            for entry in self.tmp.iterdir():
                try:
                    if entry.is_dir():
                        shutil.rmtree(entry)
                    else:
                        entry.unlink()
                    removed += 1
                except OSError as exc:
                    log.warning("could not remove temp file %s: %s", entry.name, exc)
            if removed:
                log.info("removed %d temp file(s) left by an earlier run", removed)

    def new_temp_file(self) -> SpoolTempFile:
        return SpoolTempFile(self.tmp)

    def instance_relpath(self, study_uid: str, series_uid: str, sop_uid: str) -> str:
        """``<study>/<series>/<sop>.dcm`` relative to the spool. Every UID is
        validated first: digits and dots only, so no component can be empty,
        ``..`` or contain a separator, and the path cannot leave the spool."""
        study = validate_uid(study_uid, "Study Instance UID")
        series = validate_uid(series_uid, "Series Instance UID")
        sop = validate_uid(sop_uid, "SOP Instance UID")
        return f"{study}/{series}/{sop}{INSTANCE_SUFFIX}"

    def absolute(self, relpath: str) -> str:
        """The absolute path (a string: this is on the receive path) of a
        spool-relative path from :meth:`instance_relpath`."""
        return os.path.join(self._root_text, relpath)

    def instance_path(self, study_uid: str, series_uid: str, sop_uid: str) -> Path:
        return self.root / self.instance_relpath(study_uid, series_uid, sop_uid)

    def study_dir(self, study_uid: str) -> Path:
        return self.root / validate_uid(study_uid, "Study Instance UID")

    def _make_dirs(self, directory: str) -> None:
        """Create ``directory`` and fsync each parent whose entries changed."""
        if directory in self._known_dirs:
            return
        missing = []
        d = directory
        while not os.path.isdir(d):
            missing.append(d)
            d = os.path.dirname(d)
        for d in reversed(missing):
            try:
                os.mkdir(d, 0o700)
            except FileExistsError:
                pass
            fsync_dir(os.path.dirname(d))
        if len(self._known_dirs) > 10_000:
            self._known_dirs.clear()
        self._known_dirs.add(directory)

    def commit(self, temp: str, final: str) -> bool:
        """Move a complete, fsynced temp file to ``final`` without ever
        replacing an existing file.

        Returns ``True`` when the file was put in place, ``False`` when
        ``final`` already existed (the temp file is left for the caller).
        Raises :class:`SpoolError` on an I/O error.
        """
        try:
            parent = os.path.dirname(final)
            self._make_dirs(parent)
            try:
                os.link(temp, final)  # atomic, and fails rather than clobber
            except FileExistsError:
                return False
            except OSError as exc:
                if exc.errno != errno.EXDEV:
                    raise
                self._copy_into_place(Path(temp), Path(final))
            os.unlink(temp)
            fsync_dir(parent)
            return True
        except OSError as exc:
            raise SpoolError(exc.errno, f"cannot store instance: {exc.strerror}") from exc

    def replace(self, temp: str, final: str) -> None:
        """Put ``temp`` at ``final`` even if a file is there (used only for a
        file that was never journaled, hence never acknowledged)."""
        try:
            parent = os.path.dirname(final)
            self._make_dirs(parent)
            os.replace(temp, final)
            fsync_dir(parent)
        except OSError as exc:
            raise SpoolError(exc.errno, f"cannot store instance: {exc.strerror}") from exc

    def remove(self, path: str) -> None:
        """Remove a file this process just put in place (and say so durably)."""
        try:
            os.unlink(path)
            fsync_dir(os.path.dirname(path))
        except OSError as exc:
            log.warning("could not remove %s: %s", os.path.basename(path), exc.strerror)

    def _copy_into_place(self, temp: Path, final: Path) -> None:
        part = final.with_suffix(PART_SUFFIX)
        with open(temp, "rb") as src, open(part, "xb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
            dst.flush()
            os.fsync(dst.fileno())
        os.link(part, final)
        os.unlink(part)

    def iter_instances(self) -> Iterator[Path]:
        """Every committed instance file, for reconciliation with the journal."""
        for study in self.root.iterdir():
            if not study.is_dir() or not study.name[:1].isdigit():
                continue
            for series in study.iterdir():
                if not series.is_dir():
                    continue
                for f in series.iterdir():
                    if f.suffix == INSTANCE_SUFFIX:
                        yield f

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free

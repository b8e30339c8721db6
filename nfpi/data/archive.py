"""Safe, once-only extraction of dataset archives (``.tar``, ``.tar.gz``, ``.tgz``)."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path

from nfpi.errors import DatasetNotFoundError, NfpiError

__all__ = [
    "ARCHIVE_SUFFIXES",
    "CACHE_ENV",
    "UnsafeArchiveError",
    "extract_archive",
    "is_archive",
]

logger = logging.getLogger(__name__)

ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar")
CACHE_ENV = "NFPI_DATA_CACHE"


class UnsafeArchiveError(NfpiError, ValueError):
    """An archive member would land outside the extraction folder (absolute path, ``..``,
    a link pointing outside) or is a device/FIFO; nothing of the archive is kept."""


def is_archive(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` names a file with one of :data:`ARCHIVE_SUFFIXES`."""
    return Path(path).name.lower().endswith(ARCHIVE_SUFFIXES)


def _stem(archive: Path) -> str:
    name = archive.name
    for suffix in ARCHIVE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _cache_base(archive: Path, extract_to: str | os.PathLike[str] | None) -> Path:
    """extract_to > $NFPI_DATA_CACHE > ``.nfpi-cache`` next to the archive (if writable) >
    ``$XDG_CACHE_HOME/nfpi`` (``~/.cache/nfpi``)."""
    if extract_to is not None:
        return Path(extract_to).expanduser()
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    if os.access(archive.parent, os.W_OK):
        return archive.parent / ".nfpi-cache"
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg).expanduser() / "nfpi"


def _checked_members(tf: tarfile.TarFile, dest: Path, archive: Path) -> Iterator[tarfile.TarInfo]:
    """Yield members one by one (streaming, one pass over a .tar.gz), refusing any that escapes
    ``dest``. Checked here, before tarfile's own ``data`` filter, so that the error is ours."""
    root = dest.resolve()
    for member in tf:
        target = (root / member.name).resolve()
        if os.path.isabs(member.name) or not target.is_relative_to(root):
            raise UnsafeArchiveError(
                f"archive {archive} has member {member.name!r} that would be written outside "
                f"the extraction folder {dest}; refusing to extract it (re-create the archive "
                "with relative paths, e.g. `tar czf data.tar.gz -C parent cifar10`)"
            )
        if member.issym() or member.islnk():
            base = target.parent if member.issym() else root
            link = (base / member.linkname).resolve()
            if os.path.isabs(member.linkname) or not link.is_relative_to(root):
                raise UnsafeArchiveError(
                    f"archive {archive} has link {member.name!r} -> {member.linkname!r} pointing "
                    f"outside the extraction folder {dest}; refusing to extract it"
                )
        elif not (member.isfile() or member.isdir()):
            raise UnsafeArchiveError(
                f"archive {archive} has member {member.name!r} that is neither a file, a folder "
                "nor a link (device or FIFO); refusing to extract it"
            )
        yield member


def extract_archive(
    archive: str | os.PathLike[str], extract_to: str | os.PathLike[str] | None = None
) -> Path:
    """Extract ``archive`` once and return the folder holding its contents.

    The destination is ``<base>/<archive stem>-<key>`` where ``base`` is ``extract_to``, else
    ``$NFPI_DATA_CACHE``, else ``.nfpi-cache/`` next to the archive when that folder is
    writable, else ``$XDG_CACHE_HOME/nfpi`` (``~/.cache/nfpi``); ``key`` hashes the archive's
    absolute path, size and modification time, so a replaced archive is extracted afresh.

    Extraction goes to a temporary sibling folder that is renamed into place only when complete,
    so an interrupted extraction is never mistaken for a finished one, and concurrent callers
    (several workers on one machine) are safe: the first rename wins, the others discard theirs.

    Raises:
        DatasetNotFoundError: ``archive`` does not exist or is not a readable tar archive.
        UnsafeArchiveError: a member would escape the destination (nothing is kept).
    """
    archive = Path(archive).expanduser()
    if not archive.is_file():
        raise DatasetNotFoundError(f"archive {archive} does not exist or is not a file")
    st = archive.stat()
    key = hashlib.sha1(f"{archive.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()
    base = _cache_base(archive, extract_to)
    dest = base / f"{_stem(archive)}-{key[:10]}"
    if dest.is_dir():
        logger.debug("reusing extraction of %s at %s", archive, dest)
        return dest

    made_base = not base.exists()
    base.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.partial-", dir=base))
    tmp.chmod(0o755)  # mkdtemp makes it private (0700); the extraction may be a shared cache
    try:
        logger.info("extracting %s to %s (once)", archive, dest)
        try:
            with tarfile.open(archive) as tf:
                members = _checked_members(tf, tmp, archive)
                if hasattr(tarfile, "data_filter"):
                    tf.extractall(tmp, members=members, filter="data")
                else:  # Python < 3.10.12 / 3.11.4: our own member check is the only guard
                    tf.extractall(tmp, members=members)
        except getattr(tarfile, "FilterError", ()) as e:
            raise UnsafeArchiveError(f"archive {archive}: unsafe member refused: {e}") from e
        except tarfile.TarError as e:
            # tarfile lists one reason per compression it tried; the last is plain tar's.
            reasons = [r.strip(" -") for r in str(e).splitlines() if r.strip(" -")]
            raise DatasetNotFoundError(
                f"cannot read {archive} as a tar archive ({reasons[-1] if reasons else e}): "
                "it is corrupt, truncated or another format; re-create it (e.g. "
                "`tar czf data.tar.gz -C parent folder`) or set data.root to the extracted "
                "folder"
            ) from e
        try:
            tmp.rename(dest)
        except OSError:
            if not dest.is_dir():
                raise
            logger.debug("another process extracted %s first; using %s", archive, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        if made_base and not dest.exists():
            try:
                base.rmdir()  # a failed first extraction leaves no empty cache folder behind
            except OSError:
                pass  # not empty: another process is using it
    return dest

"""Safe, once-only extraction of dataset archives (``.tar``, ``.tar.gz``, ``.tgz``).

Decompression bombs are refused on the tar headers, before a byte of the offending member is
written: an archive may hold at most ``$NFPI_ARCHIVE_MAX_BYTES`` bytes of files (default
1 TiB), ``$NFPI_ARCHIVE_MAX_MEMBERS`` members (default 20 million: ImageNet-21k holds 14 M
images) and, beyond its first 64 MiB, ``$NFPI_ARCHIVE_MAX_RATIO`` bytes of files per byte of
archive (default 200; image datasets are already compressed and stay near 1). Each limit can be
raised by its variable (or :class:`ArchiveLimits`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tarfile
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path

from nfpi.errors import ConfigError, DatasetNotFoundError, NfpiError

__all__ = [
    "ARCHIVE_SUFFIXES",
    "CACHE_ENV",
    "MAX_BYTES_ENV",
    "MAX_MEMBERS_ENV",
    "MAX_RATIO_ENV",
    "ArchiveLimits",
    "UnsafeArchiveError",
    "extract_archive",
    "is_archive",
]

logger = logging.getLogger(__name__)

ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar")
CACHE_ENV = "NFPI_DATA_CACHE"
MAX_BYTES_ENV = "NFPI_ARCHIVE_MAX_BYTES"
MAX_MEMBERS_ENV = "NFPI_ARCHIVE_MAX_MEMBERS"
MAX_RATIO_ENV = "NFPI_ARCHIVE_MAX_RATIO"
#: The ratio limit applies beyond this many bytes of files: a small archive of a few small
#: files may compress well without being a bomb.
RATIO_FLOOR = 64 * 2**20


@dataclass(frozen=True)
class ArchiveLimits:
    """How much an archive may extract to (see the module); :meth:`from_env` reads the
    ``NFPI_ARCHIVE_MAX_*`` variables over these defaults."""

    max_bytes: int = 2**40
    max_members: int = 20_000_000
    max_ratio: float = 200.0

    @classmethod
    def from_env(cls) -> ArchiveLimits:
        values = {}
        for name, env, kind in (
            ("max_bytes", MAX_BYTES_ENV, int),
            ("max_members", MAX_MEMBERS_ENV, int),
            ("max_ratio", MAX_RATIO_ENV, float),
        ):
            text = os.environ.get(env)
            if text:
                try:
                    values[name] = kind(float(text)) if kind is int else kind(text)
                except ValueError:
                    raise ConfigError(
                        env, text, f"a positive number (the archive's {name})"
                    ) from None
                if values[name] <= 0:
                    raise ConfigError(env, text, f"a positive number (the archive's {name})")
        return cls(**values)


class UnsafeArchiveError(NfpiError, ValueError):
    """An archive member is not a regular file or a folder (a symbolic or hard link, a device,
    a FIFO), or its name is absolute or has a ``..`` component; nothing of the archive is kept."""


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


_KINDS = {
    tarfile.SYMTYPE: "a symbolic link",
    tarfile.LNKTYPE: "a hard link",
    tarfile.CHRTYPE: "a character device",
    tarfile.BLKTYPE: "a block device",
    tarfile.FIFOTYPE: "a FIFO",
}


def _member_parts(member: tarfile.TarInfo, archive: Path, dest: Path) -> tuple[str, ...]:
    """The path components of ``member`` below the extraction folder, or
    :class:`UnsafeArchiveError` for any member that is not a plain file or folder with a
    relative, ``..``-free name. Names are checked as text, never resolved on disk."""
    if not (member.isreg() or member.isdir()):
        kind = _KINDS.get(member.type, f"of tar type {member.type!r}")
        target = f" -> {member.linkname!r}" if member.issym() or member.islnk() else ""
        raise UnsafeArchiveError(
            f"archive {archive} has member {member.name!r}{target}, which is {kind}; dataset "
            "archives may hold only regular files and folders, so nothing of it is extracted "
            "(re-create the archive from the real files, e.g. `tar czhf data.tar.gz -C parent "
            "tree`: -h stores what links point to)"
        )
    name = member.name
    parts = tuple(p for p in name.split("/") if p not in ("", "."))
    if os.path.isabs(name) or ".." in parts:
        raise UnsafeArchiveError(
            f"archive {archive} has member {name!r} that would be written outside the "
            f"extraction folder {dest}; refusing to extract it (re-create the archive with "
            "relative paths, e.g. `tar czf data.tar.gz -C parent cifar10`)"
        )
    return parts


def _open_dir(root_fd: int, parts: tuple[str, ...]) -> int:
    """A descriptor of the folder ``parts`` below ``root_fd``, created as needed. Every step
    opens one name relative to its parent's descriptor with ``O_NOFOLLOW``: no link is followed
    and no path is ever resolved, whatever its length."""
    fd = os.dup(root_fd)
    try:
        for part in parts:
            try:
                os.mkdir(part, 0o755, dir_fd=fd)
            except FileExistsError:
                pass
            child = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd


def _bomb(archive: Path, what: str, env: str, suggestion: str) -> UnsafeArchiveError:
    return UnsafeArchiveError(
        f"archive {archive} {what}; refusing it as a possible decompression bomb, and nothing of "
        f"it is kept. If the archive is genuine, raise the limit ({env}={suggestion}) or "
        "extract it yourself and set data.root to the folder"
    )


def _check_limits(
    member: tarfile.TarInfo, members: int, total: int, archive: Path, size: int,
    limits: ArchiveLimits,
) -> None:  # fmt: skip
    """Refuse the archive once ``members`` / ``total`` bytes (this member's included, read
    from its header) pass a limit."""
    if members > limits.max_members:
        raise _bomb(
            archive, f"has more than {limits.max_members} members", MAX_MEMBERS_ENV,
            str(limits.max_members * 10),
        )  # fmt: skip
    if total > limits.max_bytes:
        raise _bomb(
            archive,
            f"would extract to more than {limits.max_bytes} bytes (member {member.name!r} "
            f"brings the files to {total} bytes)",
            MAX_BYTES_ENV,
            str(max(total * 2, limits.max_bytes * 10)),
        )
    if total > RATIO_FLOOR and total > limits.max_ratio * max(size, 1):
        raise _bomb(
            archive,
            f"expands {total / max(size, 1):.0f}-fold (member {member.name!r} brings the "
            f"{size}-byte archive to {total} bytes of files), beyond the compression ratio "
            f"limit of {limits.max_ratio:g}",
            MAX_RATIO_ENV,
            f"{max(limits.max_ratio * 10, 2 * total / max(size, 1)):.0f}",
        )


def _extract_members(
    tf: tarfile.TarFile, root: Path, archive: Path, dest: Path,
    limits: ArchiveLimits | None = None,
) -> int:  # fmt: skip
    """Write every member of ``tf`` below ``root`` ourselves (streaming, one pass over a
    .tar.gz): folders with mode 0755, regular files with 0644 (0755 if executable). Never
    through ``tarfile.extract*``, never creating a link. Returns the number of files.
    ``limits`` (default :meth:`ArchiveLimits.from_env`) are checked on each member's header
    before it is written."""
    limits = limits or ArchiveLimits.from_env()
    size = archive.stat().st_size
    files = members = total = 0
    root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        for member in tf:
            members += 1
            total += member.size if member.isreg() else 0
            _check_limits(member, members, total, archive, size, limits)
            parts = _member_parts(member, archive, dest)
            if not parts:
                continue  # the archive's own top folder ("./")
            try:
                if member.isdir():
                    os.close(_open_dir(root_fd, parts))
                    continue
                dir_fd = _open_dir(root_fd, parts[:-1])
                try:
                    mode = 0o755 if member.mode & 0o100 else 0o644
                    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW
                    fd = os.open(parts[-1], flags, mode, dir_fd=dir_fd)
                finally:
                    os.close(dir_fd)
                source = tf.extractfile(member)
                assert source is not None  # a regular file always has contents
                with source, os.fdopen(fd, "wb") as out:
                    shutil.copyfileobj(source, out, 1 << 20)
                files += 1
            except OSError as err:
                raise DatasetNotFoundError(
                    f"cannot extract member {member.name!r} of {archive} into {dest}: "
                    f"{err.strerror or err}; check the archive (tar tzvf) and the free space"
                ) from err
    finally:
        os.close(root_fd)
    return files


def extract_archive(
    archive: str | os.PathLike[str],
    extract_to: str | os.PathLike[str] | None = None,
    *,
    limits: ArchiveLimits | None = None,
) -> Path:
    """Extract ``archive`` once and return the folder holding its contents.

    The destination is ``<base>/<archive stem>-<key>`` where ``base`` is ``extract_to``, else
    ``$NFPI_DATA_CACHE``, else ``.nfpi-cache/`` next to the archive when that folder is
    writable, else ``$XDG_CACHE_HOME/nfpi`` (``~/.cache/nfpi``); ``key`` hashes the archive's
    absolute path, size and modification time, so a replaced archive is extracted afresh.

    Extraction goes to a temporary sibling folder that is renamed into place only when complete,
    so an interrupted extraction is never mistaken for a finished one, and concurrent callers
    (several workers on one machine) are safe: the first rename wins, the others discard theirs.
    A refused or unreadable archive leaves nothing behind, not even the cache folder it made.

    Dataset trees never need links, so only regular files and folders are accepted, and each
    file is written by this function below the temporary folder, one path component at a time
    relative to its parent's descriptor (``O_NOFOLLOW``). No path is resolved with ``realpath``,
    so none can leave the folder, however long or however linked (CVE-2025-4517: links that push
    a real path past ``PATH_MAX`` made ``tarfile``'s own ``data`` filter write outside).

    Raises:
        DatasetNotFoundError: ``archive`` does not exist or is not a readable tar archive.
        UnsafeArchiveError: a member is a link, a device or a FIFO, or its name is absolute
            or has a ``..`` component, or the archive passes one of ``limits`` (default: the
            ``NFPI_ARCHIVE_MAX_*`` variables, see the module); nothing is kept.
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

    created = [p for p in (base, *base.parents) if not p.exists()]
    base.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.partial-", dir=base))
    tmp.chmod(0o755)  # mkdtemp makes it private (0700); the extraction may be a shared cache
    done = False
    try:
        logger.info("extracting %s to %s (once)", archive, dest)
        try:
            with tarfile.open(archive) as tf:
                files = _extract_members(tf, tmp, archive, dest, limits)
        except (EOFError, zlib.error) as e:  # a compressed stream cut short or damaged
            raise DatasetNotFoundError(
                f"cannot read {archive}: it is truncated or corrupt ({type(e).__name__}: "
                f"{' '.join(str(e).split())[:120]}); copy or download it again (its size now: "
                f"{st.st_size} bytes), or set data.root to the extracted folder"
            ) from None
        except tarfile.TarError as e:
            # tarfile lists one reason per compression it tried; the last is plain tar's.
            reasons = [r.strip(" -") for r in str(e).splitlines() if r.strip(" -")]
            raise DatasetNotFoundError(
                f"cannot read {archive} as a tar archive ({reasons[-1] if reasons else e}): "
                "it is corrupt, truncated or another format; re-create it (e.g. "
                "`tar czf data.tar.gz -C parent folder`) or set data.root to the extracted "
                "folder"
            ) from e
        logger.debug("extracted %d files of %s", files, archive)
        try:
            tmp.rename(dest)
        except OSError:
            if not dest.is_dir():
                raise
            logger.debug("another process extracted %s first; using %s", archive, dest)
        done = True
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        if not done:
            for folder in created:  # a refused archive leaves no empty cache folder behind
                try:
                    folder.rmdir()
                except OSError:
                    break  # not empty (another extraction uses it) or not ours to remove
    return dest

"""Dataset archives: nothing is written outside the extraction folder, whatever the archive."""

import io
import os
import tarfile
from pathlib import Path

import pytest

from nfpi.data import UnsafeArchiveError, extract_archive, load_dataset
from nfpi.errors import DatasetNotFoundError


def _symlink_chain_archive(path: Path, extraction_root: Path) -> Path:
    """The CVE-2025-4517 archive: 16 nested folders with long names, each reached through a
    one-letter symlink, push the real path of ``a/b/.../p/<long name>`` past ``PATH_MAX``, so that
    ``os.path.realpath`` (non-strict) stops resolving there and treats what follows lexically.
    A symlink at that depth points 16 levels up (really: the extraction root); ``escape`` points
    through it two more levels up, which ``realpath`` believes stays inside; ``escape/pwned.txt``
    then lands two levels above the extraction root."""
    steps = "abcdefghijklmnop"
    # Long enough that the folders' real path plus one more long name passes PATH_MAX (4096),
    # short enough that the folders themselves can still be created.
    comp = "d" * min(247, (4000 - len(str(extraction_root))) // len(steps) - 1)
    with tarfile.open(path, "w:gz", format=tarfile.PAX_FORMAT) as tar:
        prefix = ""
        for step in steps:
            folder = tarfile.TarInfo(os.path.join(prefix, comp))
            folder.type, folder.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(folder)
            link = tarfile.TarInfo(os.path.join(prefix, step))
            link.type, link.linkname = tarfile.SYMTYPE, comp
            tar.addfile(link)
            prefix = os.path.join(prefix, comp)
        deep = os.path.join(*steps, "l" * 254)
        up = tarfile.TarInfo(deep)
        up.type, up.linkname = tarfile.SYMTYPE, "../" * len(steps)
        tar.addfile(up)
        escape = tarfile.TarInfo("escape")
        escape.type, escape.linkname = tarfile.SYMTYPE, deep + "/../.."
        tar.addfile(escape)
        payload = b"written outside the extraction folder\n"
        evil = tarfile.TarInfo("escape/pwned.txt")
        evil.size = len(payload)
        tar.addfile(evil, io.BytesIO(payload))
    return path


def test_cve_2025_4517_symlink_chain_writes_nothing_outside(tmp_path):
    """Before: on Python 3.11.7, ``extract_archive`` (tarfile's ``data`` filter plus a
    ``Path.resolve`` pre-check, both built on the same non-strict ``realpath``) extracted this
    archive and wrote ``pwned.txt`` two levels above its extraction folder, i.e. into tmp_path.
    Now the first symlink is refused, naming it, and nothing is left anywhere."""
    cache = tmp_path / "cache"
    # Where the extraction happens: <cache>/.<stem>-<key>.partial-XXXXXXXX (see extract_archive).
    archive = _symlink_chain_archive(tmp_path / "evil.tar.gz", cache / ("." + "x" * 40))
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(UnsafeArchiveError, match=r"member 'a' -> 'd+', which is a symbolic link"):
        extract_archive(archive, extract_to=cache)
    assert not (tmp_path / "pwned.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no cache folder left behind
    assert not list(Path("/").glob("pwned.txt"))


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("hardlink", r"'tree/hard' -> 'tree/train/a/ok\.txt', which is a hard link"),
        ("fifo", r"'tree/fifo', which is a FIFO"),
        ("device", r"'tree/dev', which is a character device"),
        ("dotdot", r"'tree/\.\./\.\./evil\.png' that would be written outside"),
        ("absolute", r"would be written outside the extraction folder"),
    ],
)
def test_members_other_than_files_and_folders_are_refused(tmp_path, kind, message):
    """Before: hard links inside the tree, and FIFOs/devices (refused only by tarfile's filter,
    with its own error) were extracted through ``tarfile``; now every member that is not a
    regular file or a folder is refused with :class:`UnsafeArchiveError` naming it."""
    path = tmp_path / "bad.tar.gz"
    with tarfile.open(path, "w:gz") as tf:
        ok = tarfile.TarInfo("tree/train/a/ok.txt")
        ok.size = 2
        tf.addfile(ok, io.BytesIO(b"ok"))
        bad = tarfile.TarInfo(
            {"dotdot": "tree/../../evil.png", "absolute": str(tmp_path / "abs-evil.png")}.get(
                kind, f"tree/{kind[:4]}"
            )
        )
        if kind == "hardlink":
            bad.type, bad.linkname = tarfile.LNKTYPE, "tree/train/a/ok.txt"
        elif kind == "fifo":
            bad.type = tarfile.FIFOTYPE
        elif kind == "device":
            bad.name, bad.type = "tree/dev", tarfile.CHRTYPE
        else:
            bad.size = 4
        tf.addfile(bad, io.BytesIO(b"evil") if bad.isreg() else None)
    cache = tmp_path / "cache"
    with pytest.raises(UnsafeArchiveError, match=message):
        load_dataset("imagefolder", "train", root=path, extract_to=cache)
    assert not cache.exists()  # the partial extraction and the cache folder are gone
    assert not (tmp_path / "evil.png").exists() and not (tmp_path / "abs-evil.png").exists()


def test_a_good_archive_is_extracted_file_by_file(tmp_path):
    """Regular files and folders (with ``./`` prefixes, duplicates, executable bits) come out
    as tarfile would write them, read-only bits aside."""
    path = tmp_path / "good.tgz"
    with tarfile.open(path, "w:gz") as tf:
        top = tarfile.TarInfo(".")
        top.type = tarfile.DIRTYPE
        tf.addfile(top)
        for name, data, mode in (
            ("./tree/train/a/x.bin", b"first", 0o444),
            ("./tree/train/a/x.bin", b"second", 0o644),  # a later duplicate wins, as in tar
            ("./tree/run.sh", b"#!/bin/sh\n", 0o755),
        ):
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), mode
            tf.addfile(info, io.BytesIO(data))
    dest = extract_archive(path, extract_to=tmp_path / "cache")
    assert (dest / "tree" / "train" / "a" / "x.bin").read_bytes() == b"second"
    assert os.access(dest / "tree" / "run.sh", os.X_OK)
    assert not any(p.is_symlink() for p in dest.rglob("*"))
    assert extract_archive(path, extract_to=tmp_path / "cache") == dest  # once only


def test_unreadable_archive_is_a_named_error_and_leaves_nothing(tmp_path):
    path = tmp_path / "broken.tar.gz"
    path.write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(DatasetNotFoundError, match="cannot read"):
        extract_archive(path, extract_to=tmp_path / "cache" / "nested")
    assert not (tmp_path / "cache").exists()

"""Hostile and broken archives (issue 22, medium): decompression bombs are refused by total
size, member count and compression ratio, with limits a user can raise, in one line and with
nothing half-extracted left behind; a truncated .tar.gz is one line, not an EOFError."""

import io
import os
import tarfile

import pytest

from nfpi.data.archive import (
    MAX_BYTES_ENV,
    MAX_MEMBERS_ENV,
    MAX_RATIO_ENV,
    UnsafeArchiveError,
    extract_archive,
)
from nfpi.entry import run_cli
from nfpi.errors import DatasetNotFoundError


def _bomb(path, size=100 * 2**20):
    """A few hundred KB of gzip that expands to ``size`` bytes of zeros."""
    with tarfile.open(path, "w:gz", compresslevel=9) as tf:
        info = tarfile.TarInfo("tree/train/a/zeros.bin")
        info.size = size

        class Zeros(io.RawIOBase):
            def __init__(self):
                self.left = size

            def readable(self):
                return True

            def readinto(self, buffer):
                n = min(len(buffer), self.left)
                buffer[:n] = bytes(n)
                self.left -= n
                return n

        tf.addfile(info, io.BufferedReader(Zeros(), 1 << 20))
    return path


def _many(path, n):
    with tarfile.open(path, "w:gz") as tf:
        for i in range(n):
            info = tarfile.TarInfo(f"tree/train/a/{i}.bin")
            info.size = 1
            tf.addfile(info, io.BytesIO(b"x"))
    return path


def _nothing_left(cache):
    return not cache.exists() or not any(cache.rglob("*"))


def test_a_compression_bomb_is_refused_before_it_fills_the_disk(tmp_path, monkeypatch):
    """Before: a small .tar.gz was extracted whatever it expanded to (785 bytes -> 2.1 GB; 4.5
    MB filled 1 GB and failed with a traceback). Now its ratio is refused on the member's
    header, before a byte is written; the message names the variable that raises the limit,
    and raising it lets a genuine archive through."""
    path = _bomb(tmp_path / "bomb.tar.gz")
    assert path.stat().st_size < 2**20
    cache = tmp_path / "cache"
    with pytest.raises(UnsafeArchiveError, match=MAX_RATIO_ENV) as err:
        extract_archive(path, extract_to=cache)
    assert "compression ratio" in str(err.value) and "\n" not in str(err.value)
    assert _nothing_left(cache)
    monkeypatch.setenv(MAX_RATIO_ENV, "100000")
    monkeypatch.setenv(MAX_BYTES_ENV, str(2**20))
    with pytest.raises(UnsafeArchiveError, match=MAX_BYTES_ENV):
        extract_archive(path, extract_to=cache)  # now the total size stops it
    assert _nothing_left(cache)
    monkeypatch.setenv(MAX_BYTES_ENV, str(2**30))
    dest = extract_archive(path, extract_to=cache)
    assert (dest / "tree/train/a/zeros.bin").stat().st_size == 100 * 2**20


def test_too_many_members_are_refused(tmp_path, monkeypatch):
    path = _many(tmp_path / "many.tar.gz", 50)
    monkeypatch.setenv(MAX_MEMBERS_ENV, "20")
    cache = tmp_path / "cache"
    with pytest.raises(UnsafeArchiveError, match=f"more than 20 members.*{MAX_MEMBERS_ENV}"):
        extract_archive(path, extract_to=cache)
    assert _nothing_left(cache)
    monkeypatch.setenv(MAX_MEMBERS_ENV, "50")
    assert len(list(extract_archive(path, extract_to=cache).rglob("*.bin"))) == 50


def test_a_bad_limit_value_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv(MAX_BYTES_ENV, "lots")
    with pytest.raises(Exception, match=MAX_BYTES_ENV):
        extract_archive(_many(tmp_path / "a.tar.gz", 2), extract_to=tmp_path / "cache")


def test_a_truncated_tar_gz_is_one_line_and_leaves_nothing(tmp_path, capsys):
    """Before: a .tar.gz cut short raised EOFError with a 40-line traceback. Now it is a
    DatasetNotFoundError saying it is truncated, one line at the command line (exit 2)."""
    path = tmp_path / "cut.tar.gz"
    with tarfile.open(path, "w:gz") as tf:
        for i in range(4):
            data = os.urandom(200_000)  # incompressible: the cut falls inside the data
            info = tarfile.TarInfo(f"tree/train/a/{i}.bin")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    path.write_bytes(path.read_bytes()[: path.stat().st_size * 6 // 10])
    cache = tmp_path / "cache"
    with pytest.raises(DatasetNotFoundError, match="truncated"):
        extract_archive(path, extract_to=cache)
    assert _nothing_left(cache)

    def main(argv):
        extract_archive(path, extract_to=cache)

    assert run_cli(main, [], prog="nfpi") == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "truncated" in err

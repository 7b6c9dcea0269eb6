import hashlib
import os

import pytest

from avgate.errors import SpoolError
from avgate.spool import Spool


def test_memory_spool():
    s = Spool(memory_limit=100)
    s.write(b"abc")
    s.write(b"def")
    s.finish()
    assert s.in_memory and s.getvalue() == b"abcdef" and s.size == 6
    assert s.sha256 == hashlib.sha256(b"abcdef").hexdigest()
    assert b"".join(s.chunks(4)) == b"abcdef"


def test_spills_to_file_and_cleans_up(tmp_path):
    s = Spool(memory_limit=10, directory=str(tmp_path))
    for _ in range(5):
        s.write(b"0123456789")
    s.finish()
    assert not s.in_memory
    path = s.path()
    assert os.path.exists(path) and os.path.dirname(path) == str(tmp_path)
    assert s.getvalue() == b"0123456789" * 5
    s.close()
    assert not os.path.exists(path)


def test_path_materialises_memory_spool():
    with Spool.from_bytes(b"hello") as s:
        p = s.path()
        with open(p, "rb") as f:
            assert f.read() == b"hello"
    assert not os.path.exists(p)


def test_from_path_does_not_delete(tmp_path):
    f = tmp_path / "x"
    f.write_bytes(b"data")
    s = Spool.from_path(f)
    assert s.size == 4 and s.sha256 == hashlib.sha256(b"data").hexdigest()
    s.close()
    assert f.exists()


def test_from_missing_path():
    with pytest.raises(SpoolError):
        Spool.from_path("/nonexistent/avgate/file")


def test_write_after_finish_refused():
    s = Spool.from_bytes(b"x")
    with pytest.raises(SpoolError):
        s.write(b"y")


def test_from_path_is_a_snapshot(tmp_path):
    """What was hashed is what is read later: rewriting the file changes nothing."""
    f = tmp_path / "x"
    f.write_bytes(b"harmless")
    s = Spool.from_path(f)
    f.write_bytes(b"malicious!")
    assert s.getvalue() == b"harmless"
    assert s.sha256 == hashlib.sha256(b"harmless").hexdigest()
    with open(s.path(), "rb") as copy:  # engines that need a path get the snapshot's
        assert copy.read() == b"harmless"
    assert s.path() != str(f)
    s.close()


def test_from_path_stops_after_max_size(tmp_path):
    f = tmp_path / "big"
    f.write_bytes(b"x" * 10_000)
    s = Spool.from_path(f, max_size=100)
    assert s.truncated and s.size == 101
    s.close()
    s = Spool.from_path(f, max_size=10_000)
    assert not s.truncated and s.size == 10_000
    s.close()


def test_from_fd_reads_through_the_descriptor(tmp_path):
    f = tmp_path / "x"
    f.write_bytes(b"content")
    fd = os.open(f, os.O_RDONLY)
    try:
        os.lseek(fd, 3, os.SEEK_SET)  # where the client left it: neither used nor moved
        s = Spool.from_fd(fd)
        assert s.getvalue() == b"content"
        s.close()
        assert os.lseek(fd, 0, os.SEEK_CUR) == 3  # still open and where it was
    finally:
        os.close(fd)


@pytest.mark.parametrize("flags", [os.O_WRONLY, getattr(os, "O_PATH", os.O_WRONLY)])
def test_from_fd_refuses_descriptors_not_open_for_reading(tmp_path, flags):
    f = tmp_path / "secret"
    f.write_bytes(b"root only")
    fd = os.open(f, flags)
    try:
        with pytest.raises(SpoolError):
            Spool.from_fd(fd)
    finally:
        os.close(fd)


def test_reopen_fd_is_the_hashed_inode_not_the_name(tmp_path):
    s = Spool(memory_limit=4, directory=str(tmp_path))
    s.write(b"hashed content")
    s.finish()
    path = s.path()
    # someone swaps the name: the descriptor still reads what was hashed
    os.rename(path, path + ".old")
    with open(path, "wb") as f:
        f.write(b"other content!")
    fd = s.reopen_fd()
    assert fd is not None
    try:
        assert os.pread(fd, 100, 0) == b"hashed content"
        assert hashlib.sha256(os.pread(fd, 100, 0)).hexdigest() == s.sha256
        with pytest.raises(OSError):
            os.write(fd, b"x")  # read-only
    finally:
        os.close(fd)
    os.rename(path + ".old", path)
    s.close()
    assert Spool.from_bytes(b"in memory").reopen_fd() is None

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

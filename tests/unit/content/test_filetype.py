"""Magic-based type detection."""

from __future__ import annotations

import pytest

from avgate.content.filetype import Kind, detect, looks_like_mail
from tests.corpus import EICAR, sample


@pytest.mark.parametrize(("name", "kind"), [
    ("eicar.com", Kind.OTHER),
    ("eicar.zip", Kind.ZIP),
    ("eicar.tar.gz", Kind.GZIP),
    ("eicar.com.gz", Kind.GZIP),
    ("eicar.com.bz2", Kind.BZIP2),
    ("eicar.com.xz", Kind.XZ),
    ("eicar.7z", Kind.SEVENZIP),
    ("mail-base64.eml", Kind.MAIL),
    ("clean.txt", Kind.OTHER),
])
def test_detect_corpus(name: str, kind: Kind) -> None:
    assert detect(sample(name).data) is kind


def test_detect_plain_tar() -> None:
    from tests.corpus import make_tar

    assert detect(make_tar([("a", EICAR)])) is Kind.TAR


@pytest.mark.parametrize(("data", "is_mail"), [
    (b"From: a@b\r\nSubject: x\r\n\r\nbody", True),
    (b"Received: from x\n\tby y\nX-Spam: no\n\nbody", True),
    (b"From sender@example.org Mon Jan  1 00:00:00 2024\nSubject: x\n\n", True),
    (b"Note: hello\n\nSubject: in the body does not count\n", False),
    (b"just text\nSubject: x\n", False),
    (b"", False),
    (b"BZh9 not really bzip2", False),
])
def test_looks_like_mail(data: bytes, is_mail: bool) -> None:
    assert looks_like_mail(data) is is_mail


def test_bzip2_needs_its_block_magic() -> None:
    assert detect(b"BZh91AY&SY" + bytes(20)) is Kind.BZIP2
    assert detect(b"BZh9 some text") is Kind.OTHER


def test_detection_stays_cheap_on_long_lines() -> None:
    # A long line that is no header field must not be scanned character by character (nor
    # backtracked), and a zip's end record is only looked for in the last 64 KiB.
    import time

    samples = [b"Note: hello\n" + b"x" * 2_000_000, b"x" * 2_000_000,
               b"J" * 5000 + b" v\r\n" + b"y" * 2_000_000, bytes(2_000_000)]
    for data in samples:
        start = time.perf_counter()
        for _ in range(20):
            assert detect(data) is Kind.OTHER
        assert (time.perf_counter() - start) / 20 < 0.005

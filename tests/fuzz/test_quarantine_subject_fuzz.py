"""Hypothesis fuzzing of the quarantine's subject (issue 16): :func:`subject_of` over arbitrary
header bytes, and the escaped LIKE pattern of the subject filter (:func:`like_pattern`)
against Python's ``in``, inside SQLite (the same pattern runs in PostgreSQL in
tests/integration/test_postgres_quarantine.py).
"""

from __future__ import annotations

import os
import re
import sqlite3
from collections.abc import Iterator

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from avgate.quarantine.base import like_pattern
from avgate.quarantine.subject import SUBJECT_MAX, subject_of

EXAMPLES = int(os.environ.get("AVGATE_FUZZ_EXAMPLES", "200"))
UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e"
                    "\u2066-\u2069\ud800-\udfff\ufeff]")

# header-ish bytes: field names, colons, folding, encoded-word syntax, 8-bit and controls
pieces = st.sampled_from([b"Subject:", b"subject :", b"From: a", b"\r\n", b"\n", b" ", b"\t",
                          b"=?", b"?=", b"?q?", b"?b?", b"utf-8", b"iso-8859-1", b"bogus",
                          b"=C3=A9", b"4oCu", b"_", b"\xe9", b"\xc3", b"\x00", b"\x1b",
                          b"\xe2\x80\xae", b":", b"x", b"\r\n\r\n"])
headers = st.lists(pieces, max_size=40).map(b"".join)


@settings(max_examples=EXAMPLES, deadline=None)
@given(head=headers | st.binary(max_size=300))
@example(head=b"Subject: =?utf-8?b?4oCu?=\r\n")
@example(head=b"Subject: =?utf-8?q?=00=1b?=\r\n\r\n")
@example(head=b"Subject:\r\n\r\n")
def test_subject_of_never_raises_and_is_one_safe_line(head: bytes) -> None:
    subject = subject_of(head)
    assert isinstance(subject, str) and len(subject) <= SUBJECT_MAX
    assert not UNSAFE.search(subject), repr(subject)
    assert subject == subject.strip() and "  " not in subject


@pytest.fixture(scope="module")
def db() -> Iterator[sqlite3.Connection]:
    conn = sqlite3.connect(":memory:")
    yield conn
    conn.close()


TEXT = st.text(alphabet="ab%_\\Xé[]*?", max_size=8)


@settings(max_examples=EXAMPLES, deadline=None)
@given(needle=st.text(alphabet="ab%_\\Xé[]*?\x00", max_size=8), value=TEXT)  # no stored NUL
@example(needle="\x00", value="abc")  # SQLite's LIKE would end the pattern at a NUL
@example(needle="50%", value="500 off")
@example(needle="a_b", value="axb")
@example(needle="\\", value="\\\\")
@example(needle="\\%", value="\\x")
def test_the_like_pattern_finds_exactly_the_substring(db: sqlite3.Connection, needle: str,
                                                      value: str) -> None:
    row = db.execute("SELECT ? LIKE ? ESCAPE '\\'", (value.lower(), like_pattern(needle)))
    assert bool(row.fetchone()[0]) == (needle.lower() in value.lower())

"""Fuzz the Office readers (avgate.content.office: OLE2 streams and VBA, Ole10Native and
Packager objects, RTF ``\\objdata``; OOXML through the zip reader) with time and memory
bounds (tests/fuzz/bounded.py: olefile and zlib allocate outside tracemalloc's view)."""

from __future__ import annotations

import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from avgate.content.office import parse_ole1, parse_ole10native, parse_package
from tests.corpus import (
    CLEAN_TEXT,
    EICAR,
    MARKER,
    docx_with_ole,
    make_ole,
    ole10native,
    ole_with_package,
    packager,
    rtf_object,
    vba_project,
)
from tests.fuzz.bounded import check
from tests.fuzz.documents import EXAMPLES, mutated

VBA = b'Sub AutoOpen()\r\n  Shell "' + MARKER + b'"\r\nEnd Sub\r\n'
OLE_SEEDS = [make_ole([("WordDocument", bytes(600)), ("Data", EICAR)]),
             ole_with_package("eicar.com", EICAR),
             make_ole([("WordDocument", bytes(600)),
                       *(("Macros/" + n, d) for n, d in vba_project(VBA))])]
RTF_SEEDS = [rtf_object("Package", packager("eicar.com", EICAR)),
             rtf_object("Package", packager("a.txt", CLEAN_TEXT), split=False),
             rtf_object("Word.Document.8", make_ole([("WordDocument", b"x " + MARKER)]))]
OOXML_SEEDS = [docx_with_ole(ole_with_package("eicar.com", EICAR))]
# OLE2 sector numbers with a meaning (free, end of chain, FAT, DIFAT), sizes, RTF words
TOKENS = [struct.pack("<I", n) for n in (0, 1, 0xFFFFFFFF, 0xFFFFFFFE, 0xFFFFFFFD,
                                         0xFFFFFFFC, 0x7FFFFFFF, 0x1000)] + [
    b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1", b"{\\object", b"{\\*\\objdata ", b"\\bin99999999 ",
    b"\\bin4 ", b"}", b"{", b"0102", b"\\'41", b"\x01Ole10Native", b"PK\x03\x04"]


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated(OLE_SEEDS, TOKENS))
def test_mutated_ole2(data: bytes) -> None:
    check(data)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated(RTF_SEEDS, TOKENS))
def test_mutated_rtf(data: bytes) -> None:
    check(data)


@settings(max_examples=max(EXAMPLES // 2, 10), deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(mutated(OOXML_SEEDS, TOKENS))
def test_mutated_ooxml(data: bytes) -> None:
    check(data)


@settings(max_examples=EXAMPLES, deadline=None)
@given(st.binary(max_size=1024) | mutated([packager("eicar.com", EICAR),
                                           ole10native("a.txt", CLEAN_TEXT)], TOKENS))
def test_native_object_parsers_any_bytes(data: bytes) -> None:
    for parse in (parse_package, parse_ole10native):
        try:
            _, content = parse(data)
        except (ValueError, struct.error):
            continue
        assert len(content) <= len(data)
    found = parse_ole1(data)
    if found is not None:
        assert len(found[1]) <= len(data)

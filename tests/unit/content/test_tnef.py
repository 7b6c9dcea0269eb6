"""MS-TNEF (winmail.dat): attachments by name, MAPI properties, embedded messages, corrupt
and hostile streams (avgate.content.tnef)."""

from __future__ import annotations

import struct
import time

import pytest

from avgate.content import Part, Problem, decompose
from avgate.content.filetype import Kind, detect
from avgate.engines.embedded import EmbeddedEngine
from avgate.limits import Limits
from avgate.result import ScanStatus
from tests.corpus import (
    CLEAN_TEXT,
    EICAR,
    MARKER,
    Sample,
    document_samples,
    html_smuggling,
    make_tnef,
)
from tests.unit.content.signatures import signature_engine

SIGNATURE = b"\x78\x9f\x3e\x22\x00\x00"
TNEF_SAMPLES = [s for s in document_samples() if "tnef" in s.name or s.name == "winmail.dat"]


def attribute(level: int, ident: int, data: bytes, length: int | None = None) -> bytes:
    size = len(data) if length is None else length
    return struct.pack("<BII", level, ident, size) + data + b"\0\0"  # checksum: ignored


def mapi(*props: bytes) -> bytes:
    return struct.pack("<I", len(props)) + b"".join(props)


def binary(tag: int, value: bytes, count: int = 1) -> bytes:
    return struct.pack("<III", tag, count, len(value)) + value + b"\0" * (-len(value) % 4)


def string8(tag: int, text: bytes) -> bytes:
    return binary(tag, text + b"\0")


REND = attribute(2, 0x00069002, b"\0" * 14)


def run(data: bytes, limits: Limits | None = None) -> list[Part | Problem]:
    return list(decompose(data, limits or Limits(), "winmail.dat"))


def parts(items: list[Part | Problem]) -> dict[str, bytes]:
    return {i.path: i.data for i in items if isinstance(i, Part)}


def problems(items: list[Part | Problem]) -> list[tuple[ScanStatus, str]]:
    return [(i.status, i.reason) for i in items if isinstance(i, Problem)]


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> EmbeddedEngine:
    return signature_engine(tmp_path_factory.mktemp("sigs"))


@pytest.mark.parametrize("sample", TNEF_SAMPLES, ids=lambda s: s.name)
def test_sample_verdict(engine: EmbeddedEngine, sample: Sample) -> None:
    result = engine.scan_bytes(sample.data)
    assert result.status is sample.expected, result.reason
    assert {f.name for f in result.findings} == ({sample.virus} if sample.virus else set())


def test_attachments_named_by_their_long_names() -> None:
    data = make_tnef([("eicar test file.com", EICAR), ("report.txt", CLEAN_TEXT)],
                     body=b"Hello")
    assert detect(data) is Kind.TNEF
    items = run(data)
    assert parts(items) == {
        "winmail.dat": data,
        "winmail.dat/body.txt": b"Hello",
        "winmail.dat/eicar test file.com": EICAR,
        "winmail.dat/report.txt": CLEAN_TEXT,
    }
    assert problems(items) == []


@pytest.mark.parametrize(("attrs", "name"), [
    ([attribute(2, 0x00018010, b"EICAR~1.COM\0")], "EICAR~1.COM"),  # attAttachTitle
    ([attribute(2, 0x00069005, mapi(string8(0x3704001E, b"SHORT.COM")))], "SHORT.COM"),
    ([], "attachment1"),
    ([attribute(2, 0x00018010, b"../../etc/evil.com\0")], "etc/evil.com"),  # sanitised
])
def test_name_fallbacks(attrs: list[bytes], name: str) -> None:
    data = SIGNATURE + REND + b"".join(attrs) + attribute(2, 0x0006800F, EICAR)
    assert parts(run(data))[f"winmail.dat/{name}"] == EICAR


def test_data_in_mapi_property_and_unicode_long_name() -> None:
    name = "ÉICAR.com".encode("utf-16-le") + b"\0\0"
    props = mapi(binary(0x3707001F, name),
                 binary(0x37010102, EICAR))
    data = SIGNATURE + REND + attribute(2, 0x00069005, props)
    assert parts(run(data))["winmail.dat/ÉICAR.com"] == EICAR


def test_embedded_message_is_decomposed_in_turn() -> None:
    inner = make_tnef([("inner.com", EICAR)])
    iid = bytes(16)
    props = mapi(binary(0x3701000D, iid + inner), string8(0x3707001E, b"forwarded.msg"))
    data = SIGNATURE + REND + attribute(2, 0x00069005, props)
    found = parts(run(data))
    assert found["winmail.dat/forwarded.msg"] == inner
    assert found["winmail.dat/forwarded.msg/inner.com"] == EICAR


def test_message_body_properties_are_parts() -> None:
    page = html_smuggling(EICAR)
    props = mapi(binary(0x10130102, page), string8(0x1000001E, b"plain " + MARKER))
    data = SIGNATURE + attribute(1, 0x00069003, props)
    found = parts(run(data))
    assert found["winmail.dat/body.html"] == page
    assert found["winmail.dat/body.html/data-uri1"] == EICAR  # the HTML body is read too
    assert found["winmail.dat/body.txt"] == b"plain " + MARKER + b"\0"


def test_multi_valued_and_named_properties_are_skipped_correctly() -> None:
    named = (struct.pack("<I", 0x80010003) + bytes(16) + struct.pack("<II", 0, 7)
             + struct.pack("<I", 5))
    multi_long = (struct.pack("<I", 0x80021003) + bytes(16) + struct.pack("<II", 1, 4)
                  + b"nm\0\0" + struct.pack("<I", 2) + struct.pack("<II", 1, 2))
    props = mapi(named, multi_long, binary(0x37010102, EICAR))
    data = SIGNATURE + REND + attribute(2, 0x00069005, props)
    assert parts(run(data))["winmail.dat/attachment1"] == EICAR


def test_truncated_attachment_is_scanned_and_unknown() -> None:
    data = SIGNATURE + REND + attribute(2, 0x00018010, b"x.com\0") + struct.pack(
        "<BII", 2, 0x0006800F, 1000) + b"x " + MARKER
    items = run(data)
    assert parts(items)["winmail.dat/x.com"] == b"x " + MARKER
    assert problems(items) == [
        (ScanStatus.UNKNOWN, "corrupt TNEF: attribute longer than the stream")]


def test_bad_checksum_still_scanned() -> None:
    data = bytearray(make_tnef([("eicar.com", EICAR)]))
    data[-2:] = b"\xff\xff"  # the last attribute's checksum
    assert parts(run(bytes(data)))["winmail.dat/eicar.com"] == EICAR


@pytest.mark.parametrize("block", [
    struct.pack("<I", 0xFFFFFFFF),  # a property count the block cannot hold
    struct.pack("<III", 1, 0x37010102, 0xFFFFFFFF),  # a value count
    struct.pack("<IIII", 1, 0x37010102, 1, 0xFFFFFFF0),  # a value length
    struct.pack("<II", 1, 0x37010999),  # an unknown type
])
def test_hostile_mapi_counts_are_refused_at_once(block: bytes) -> None:
    data = SIGNATURE + REND + attribute(2, 0x0006800F, EICAR) + attribute(2, 0x00069005, block)
    start = time.perf_counter()
    items = run(data)
    assert time.perf_counter() - start < 1
    assert parts(items)["winmail.dat/attachment1"] == EICAR  # the data attribute is kept
    [(status, reason)] = problems(items)
    assert status is ScanStatus.UNKNOWN and reason.startswith("corrupt TNEF: ")


def test_many_tiny_attributes_are_linear() -> None:
    data = SIGNATURE + attribute(1, 0x00018004, b"s") * 200_000  # 2.4 MB of subjects
    start = time.perf_counter()
    assert problems(run(data)) == []
    assert time.perf_counter() - start < 5


def test_attachment_count_stops_at_max_files() -> None:
    data = make_tnef([(f"f{i}.txt", b"%d" % i) for i in range(20)])
    items = run(data, Limits(max_files=5))
    assert len(parts(items)) == 6
    assert problems(items)[-1][0] is ScanStatus.SKIPPED


def test_empty_attachment_headers_stop_at_max_files() -> None:
    # thousands of attachments without data, then one with: refused, never scanned as clean
    data = SIGNATURE + REND * 50 + attribute(2, 0x0006800F, EICAR)
    items = run(data, Limits(max_files=10))
    assert EICAR not in parts(items).values()
    [(status, reason)] = problems(items)
    assert status is ScanStatus.SKIPPED and reason.startswith("file count limit")

"""Office: OLE2 streams, VBA sources (MS-OVBA), Ole10Native objects, RTF \\objdata, and OOXML
embedded objects through the recursion. Samples come from tests/corpus.py (make_ole writes a
version 3 compound file byte by byte)."""

from __future__ import annotations

import struct
import time

import olefile
import pytest

from avgate.content import Part, Problem, decompose
from avgate.content.filetype import Kind, detect
from avgate.content.office import (
    VbaError,
    decompress_vba,
    objdata_bytes,
    parse_ole1,
    parse_ole10native,
    vba_modules,
)
from avgate.limits import Limits
from avgate.result import ScanStatus
from tests.corpus import (
    CLEAN_TEXT,
    EICAR,
    MARKER,
    docx_with_ole,
    make_ole,
    ole10native,
    ole_with_package,
    ovba_compress,
    packager,
    rtf_object,
    vba_project,
)


def run(data: bytes, limits: Limits | None = None) -> list[Part | Problem]:
    return list(decompose(data, limits or Limits(), "m"))


def parts(items: list[Part | Problem]) -> list[Part]:
    return [i for i in items if isinstance(i, Part)]


def problems(items: list[Part | Problem]) -> list[Problem]:
    return [i for i in items if isinstance(i, Problem)]


def found(items: list[Part | Problem], payload: bytes) -> list[str]:
    return [p.path for p in parts(items) if p.data == payload]


# -- MS-OVBA ----------------------------------------------------------------------------------
# MS-OVBA 3.2: the specification's own examples
SPEC_EXAMPLES = [
    ("01 19 B0 00 61 62 63 64 65 66 67 68 00 69 6A 6B 6C 6D 6E 6F 70 00 71 72 73 2E",
     b"abcdefghijklmnopqrs."),
    ("01 2F B0 00 23 61 61 61 62 63 64 65 82 66 00 70 61 67 68 69 6A 01 38 08 61 6B 6C 00 30"
     " 6D 6E 6F 70 06 71 02 70 04 10 72 73 74 75 76 10 77 78 79 7A 00 3C",
     b"#aaabcdefaaaaghijaaaaaklaaamnopqaaaaaaaaaaaarstuvwxyzaaa"),
]


@pytest.mark.parametrize(("compressed", "plain"), SPEC_EXAMPLES)
def test_ovba_specification_examples(compressed: str, plain: bytes) -> None:
    assert decompress_vba(bytes.fromhex(compressed), 1 << 20) == plain


def test_ovba_uncompressed_chunk_and_round_trip() -> None:
    raw = bytes(range(256)) * 16  # 4096 bytes: one uncompressed chunk (flag bit clear)
    assert decompress_vba(b"\x01" + struct.pack("<H", 0x3FFF) + raw, 1 << 20) == raw
    text = b"Sub X()\r\n" * 1000
    assert decompress_vba(ovba_compress(text), 1 << 20) == text


def test_ovba_output_is_capped() -> None:
    # a chunk of copy tokens: 2 bytes each make up to 4 KiB; never more than cap + 1 out
    assert len(decompress_vba(ovba_compress(bytes(100_000)), 1000)) == 1001


@pytest.mark.parametrize("bad", [b"", b"\x02abc", b"\x01\x00\x00",
                                 b"\x01\x03\xb0\x01\x00\x10"])  # copy before any literal
def test_ovba_bad_containers_raise(bad: bytes) -> None:
    with pytest.raises(VbaError):
        decompress_vba(bad, 1 << 20)


def test_dir_stream_lists_modules_with_their_offsets() -> None:
    streams = dict(vba_project(b"Sub A()\r\nEnd Sub\r\n", "Module7"))
    modules = vba_modules(decompress_vba(streams["VBA/dir"], 1 << 20))
    assert modules == [("Module7", 64)]
    assert vba_modules(b"\x01\x00\xff\xff\xff\xff") == []  # a record past the end


# -- OLE2 ---------------------------------------------------------------------------------------
def test_every_stream_is_a_part_named_by_its_path() -> None:
    data = make_ole([("WordDocument", bytes(5000)), ("Data", EICAR),
                     ("ObjectPool/_1/Contents", CLEAN_TEXT)])
    assert detect(data) is Kind.OLE
    items = run(data)
    assert not problems(items)
    assert {p.path: p.data for p in parts(items)[1:]} == {
        "m/WordDocument": bytes(5000), "m/Data": EICAR, "m/ObjectPool/_1/Contents": CLEAN_TEXT}


def test_ole10native_is_unwrapped_to_the_embedded_file() -> None:
    items = run(ole_with_package("invoice.com", EICAR))
    assert found(items, EICAR) == ["m/ObjectPool/_1/Ole10Native/invoice.com"]
    assert parse_ole10native(ole10native("a.txt", b"hello")) == ("a.txt", b"hello")
    # a native stream that is no Packager object: its data under "native"
    assert parse_ole10native(struct.pack("<L", 3) + b"abc") == ("native", b"abc")


def test_vba_module_source_is_decompressed() -> None:
    source = b'Sub AutoOpen()\r\n  Shell "' + MARKER + b'"\r\nEnd Sub\r\n'
    data = make_ole([("Macros/" + n, d) for n, d in vba_project(source)])
    items = run(data)
    assert not any(MARKER in p.data for p in parts(items)[:-1])  # only the source shows it
    (vba,) = [p for p in parts(items) if p.path.endswith("source.vba")]
    assert (vba.path, vba.data) == ("m/Macros/VBA/Module1/source.vba", source)


def test_ooxml_embedded_ole_object_through_the_recursion() -> None:
    items = run(docx_with_ole(ole_with_package("eicar.com", EICAR)))
    assert found(items, EICAR) == [
        "m/word/embeddings/oleObject1.bin/ObjectPool/_1/Ole10Native/eicar.com"]
    clean = run(docx_with_ole(ole_with_package("a.txt", CLEAN_TEXT)))
    assert not problems(clean) and found(clean, EICAR) == []


def test_encrypted_ooxml_in_ole_is_unknown() -> None:
    data = make_ole([("EncryptionInfo", b"\x04\x00\x04\x00" + bytes(60)),
                     ("EncryptedPackage", bytes(5000))])
    assert Problem("m/EncryptedPackage", ScanStatus.UNKNOWN, "encrypted") in problems(run(data))


def _with_fat_entry(data: bytes, sector: int, value: int) -> bytes:
    """``data`` with FAT entry ``sector`` set to ``value`` (the FAT is sector 0)."""
    out = bytearray(data)
    struct.pack_into("<L", out, 512 + 4 * sector, value)
    return bytes(out)


def test_sector_chain_that_loops_is_refused_before_reading() -> None:
    data = make_ole([("Big", bytes(range(256)) * 64)])  # 16 KiB: 32 sectors in the FAT
    ole = olefile.OleFileIO(data)
    start = ole.direntries[1].isectStart
    ole.close()
    looped = _with_fat_entry(data, start + 31, start)  # the last sector points to the first
    started = time.perf_counter()
    items = run(looped)
    assert time.perf_counter() - started < 1.0
    assert [(p.path, p.status) for p in problems(items)] == [("m/Big", ScanStatus.UNKNOWN)]
    assert "loops" in problems(items)[0].reason


def test_stream_larger_than_the_file_is_corrupt() -> None:
    data = bytearray(make_ole([("Data", bytes(5000))]))
    entry = 512 + 512 + 128  # the FAT, then the directory: entry 1
    struct.pack_into("<L", data, entry + 120, 0x7FFF_0000)
    (problem,) = problems(run(bytes(data)))
    assert problem.status is ScanStatus.UNKNOWN and "larger than the file" in problem.reason


def test_not_an_ole_file_after_the_magic() -> None:
    data = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + bytes(600)
    (problem,) = problems(run(data))
    assert problem.status is ScanStatus.UNKNOWN and problem.reason.startswith("corrupt")


# -- RTF ----------------------------------------------------------------------------------------
def test_rtf_package_object_is_unwrapped() -> None:
    data = rtf_object("Package", packager("eicar.com", EICAR))
    assert detect(data) is Kind.RTF
    items = run(data)
    assert found(items, EICAR) == ["m/object1/Package/eicar.com"]
    assert not problems(items)


def test_rtf_ole2_object_is_opened() -> None:
    items = run(rtf_object("Word.Document.8", make_ole([("WordDocument", EICAR)])))
    assert found(items, EICAR) == ["m/object1/Word.Document.8/WordDocument"]


def test_objdata_hex_with_groups_odd_nibbles_and_bin() -> None:
    rtf = b"41 4\r\n2{\\*\\x 4344}\\par 43\\bin3 \x00\xff}44}trailer"
    data, end = objdata_bytes(rtf, 0, 1000)
    assert data == b"ABC\x00\xff}D"  # the group is skipped, "4" "2" make one byte
    assert rtf[end:] == b"trailer"


def test_objdata_is_capped() -> None:
    rtf = b"{\\rtf1{\\object{\\*\\objdata " + b"41" * 10_000 + b"}}}"
    data, _ = objdata_bytes(rtf, rtf.index(b"objdata") + 7, 100)
    assert len(data) == 101
    items = run(rtf, Limits(max_file_size=len(rtf), max_scan_size=len(rtf) + 5000))
    assert [(p.path, p.reason) for p in problems(items)] == [("m/object1", "scan size limit")]


def test_ole1_header_parsing() -> None:
    cls = b"Package\x00"
    ole1 = (struct.pack("<LL", 0x501, 2) + struct.pack("<L", len(cls)) + cls
            + struct.pack("<LLL", 0, 0, 3) + b"abc")
    assert parse_ole1(ole1) == ("Package", b"abc")
    assert parse_ole1(struct.pack("<LL", 0x501, 1) + bytes(20)) is None  # linked, not embedded
    assert parse_ole1(b"\x01\x05") is None


def test_clean_twins() -> None:
    for data in (rtf_object("Package", packager("a.txt", CLEAN_TEXT)),
                 make_ole([("WordDocument", bytes(600)), *(
                     ("Macros/" + n, d) for n, d in vba_project(b"Sub A()\r\nEnd Sub\r\n"))])):
        items = run(data)
        assert not problems(items)
        assert not any(EICAR in p.data or MARKER in p.data for p in parts(items))

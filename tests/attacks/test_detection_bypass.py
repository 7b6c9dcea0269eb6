"""Content shaped to hide EICAR from decomposition: each must now be found (INFECTED).

Before the fix (issue 11, section 3), each of these was ``clean`` on every front-end:

* a zip with one junk byte before it, or a self-extracting zip (a stub, then the zip):
  detected only by a signature at offset 0, so scanned as an opaque blob;
* a mail whose first header field is long (an unknown field of 5 KB), so that the known
  fields start after the 4 KiB that type detection looked at: not recognised as mail, its
  base64 attachment never decoded;
* a ``begin-base64 644 name`` block (``uuencode -m``): matched as uuencode, decoded as
  uuencode (and the block was not even looked for: the quick test wanted "begin ");
* EICAR as the preamble or the epilogue of a multipart message (never a part of its own);
* a header line with blanks before its colon (``X-A : b``, RFC 5322 obsolete syntax) before
  ``Content-Type``: Python ends the header block there, so the attachment stayed body text.

Found on the way, same class: a 7z member named ``../x`` or ``C:x`` (py7zr refused the whole
archive), a 7z or zip member with a wrong CRC (the member, and for 7z every later one, was
dropped), and a zip member whose local header name differs from the central directory's
(zipfile refused it; unzip extracts it).

Samples are generated here; the embedded engine matches EICAR only at offset 0 of a part, so
each test proves the content was decomposed to the right part.
"""

from __future__ import annotations

import zipfile
from collections.abc import Callable

import pytest

from avgate.engines.base import EngineContext, build_engine
from avgate.engines.embedded import EICAR_NAME, EmbeddedEngine, EmbeddedEngineSettings
from avgate.limits import Limits
from avgate.result import ScanStatus
from tests.corpus import EICAR, make_zip, raw_zip
from tests.unit.content.hostile import (
    b64,
    begin_base64_text,
    corrupt_crc_7z,
    epilogue_mail,
    junk_prefixed_zip,
    long_first_header_mail,
    multipart_mail,
    preamble_mail,
    renamed_7z,
    self_extracting_zip,
)


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> EmbeddedEngine:
    ctx = EngineContext(limits=Limits(), base_dir=str(tmp_path_factory.mktemp("bypass")))
    eng = build_engine(EmbeddedEngineSettings(), ctx)
    assert isinstance(eng, EmbeddedEngine)
    eng.load()
    return eng


def infected_at(engine: EmbeddedEngine, data: bytes) -> list[str]:
    """The paths EICAR was found at; the verdict must be INFECTED."""
    result = engine.scan_bytes(data)
    assert result.status is ScanStatus.INFECTED, result
    assert {f.name for f in result.findings} == {EICAR_NAME}
    return [f.part for f in result.findings]


def _local_name_mismatch() -> bytes:
    data = bytearray(make_zip([("eicar.com", EICAR)]))
    at = data.find(b"eicar.com")  # the local header's copy of the name
    data[at:at + 5] = b"EVIL!"
    return bytes(data)


CASES: dict[str, tuple[Callable[[], bytes], list[str]]] = {
    "zip-one-junk-byte": (junk_prefixed_zip, ["eicar.com"]),
    "zip-self-extracting": (self_extracting_zip, ["eicar.com"]),
    "zip-64k-prefix": (lambda: junk_prefixed_zip(bytes(70_000)), ["eicar.com"]),
    "mail-5kb-first-header": (long_first_header_mail, ["1"]),
    "mail-300kb-first-header": (lambda: long_first_header_mail(300_000), ["1"]),
    "mail-folded-first-header": (lambda: multipart_mail(
        [EICAR], first_header=b"Junk: a\r\n" + b"\tfolded\r\n" * 2000), ["1"]),
    "begin-base64-text": (begin_base64_text, ["eicar.com"]),
    "begin-base64-in-mail": (lambda: multipart_mail([b"x"]).replace(
        b"Content-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n\r\n"
        + b64(b"x"), b"Content-Type: text/plain\r\n\r\n" + begin_base64_text()),
        ["1/eicar.com"]),
    "mime-preamble": (preamble_mail, ["preamble"]),
    "mime-epilogue": (epilogue_mail, ["epilogue"]),
    "7z-member-named-dotdot": (lambda: renamed_7z([("a.txt", b"ok"), ("../evil.com", EICAR)]),
                               ["evil.com"]),
    "7z-member-named-drive": (lambda: renamed_7z([("C:evil.com", EICAR)]), ["C:evil.com"]),
    "7z-bad-crc-before-eicar": (lambda: corrupt_crc_7z(
        [("a.txt", b"A" * 40), ("eicar.com", EICAR)], "a.txt"), ["eicar.com"]),
    "zip-bad-crc": (lambda: raw_zip(
        [("eicar.com", zipfile.ZIP_STORED, 0, 1234, len(EICAR), EICAR)]), ["eicar.com"]),
    "zip-local-name-differs": (_local_name_mismatch, ["eicar.com"]),
    # obs-optional (RFC 5322 4.5.3): blanks before the colon end Python's header block, so
    # the multipart was never parsed; many readers take it as a header and decode it
    "mail-blank-before-colon": (lambda: multipart_mail(
        [EICAR], first_header=b"X-A : b\r\n"), ["~obsheader/1"]),
    "mail-tab-before-colon": (lambda: multipart_mail(
        [EICAR], first_header=b"Subject\t: hello\r\n"), ["~obsheader/1"]),
}


@pytest.mark.parametrize("case", CASES)
def test_bypass_is_scanned(engine: EmbeddedEngine, case: str) -> None:
    build, paths = CASES[case]
    assert infected_at(engine, build()) == paths


def test_junk_zip_inside_a_mail(engine: EmbeddedEngine) -> None:
    data = multipart_mail([self_extracting_zip()])
    assert infected_at(engine, data) == ["1/eicar.com"]


def test_preamble_of_a_nested_multipart(engine: EmbeddedEngine) -> None:
    inner = (b"Content-Type: multipart/mixed; boundary=in\r\n\r\n" + EICAR + b"\r\n"
             b"--in\r\n\r\nx\r\n--in--\r\n")
    data = multipart_mail([b"a"]).replace(b"--b0undary--", b"--b0undary\r\n" + inner
                                          + b"--b0undary--")
    assert infected_at(engine, data) == ["2/preamble"]


def test_the_whole_message_alone_never_matched(engine: EmbeddedEngine) -> None:
    # The samples only match once decomposed: the object itself is never the EICAR file.
    for case, (build, _) in CASES.items():
        assert engine.match_part(build()) == [], case

"""The generated test corpus: EICAR and a body marker, hidden every way decomposition handles.

Everything is built by code (no binary blobs in the repository) and cached. The same samples
check the embedded engine and a real clamd, which both use an EICAR md5 ``.hdb`` and an
``.ndb`` body signature ``Test.Body.Pattern`` over :data:`MARKER`; ``clamd_expected`` marks
the samples where clamd's verdict legitimately differs (it reports encrypted archives and
members over its size limits as clean unless optional heuristics are enabled).
"""

from __future__ import annotations

import base64
import binascii
import bz2
import functools
import gzip
import io
import lzma
import struct
import tarfile
import zipfile
import zlib
from collections.abc import Iterable
from dataclasses import dataclass

from avgate.result import ScanStatus

EICAR = rb"X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"
MARKER = b"THIS-IS-A-TEST-MALWARE-MARKER"
EICAR_NAME = "Eicar-Test-Signature"
MARKER_NAME = "Test.Body.Pattern"
MARKER_NDB = f"{MARKER_NAME}:0:*:{MARKER.hex()}\n"  # ClamAV .ndb line for MARKER

BOMB_SIZE = 200 * 1024 * 1024  # what the zip bomb's member inflates to
ZIP_PASSWORD = b"infected"

CLEAN_TEXT = b"Quarterly figures attached.\nNothing to see here, just plain text.\n"

assert len(EICAR) == 68


@dataclass(frozen=True, slots=True)
class Sample:
    """One corpus object and what a scan of it must report."""

    name: str
    data: bytes
    expected: ScanStatus
    virus: str | None  # expected finding name prefix, None when nothing must be found
    clamd_expected: ScanStatus | None = None  # clamd's verdict where it differs; None = same


# -- mail -----------------------------------------------------------------------------------
CRLF = b"\r\n"


def _crlf(text: bytes) -> bytes:
    return text.replace(b"\r\n", b"\n").replace(b"\n", CRLF)


def encode_base64(data: bytes) -> bytes:
    return _crlf(base64.encodebytes(data))


def encode_qp_all(data: bytes) -> bytes:
    """Quoted-printable with every octet encoded (=XX), so nothing is readable undecoded."""
    encoded = "".join(f"={b:02X}" for b in data)
    lines = [encoded[i:i + 72] for i in range(0, len(encoded), 72)]
    return ("=\r\n".join(lines) + "\r\n").encode("ascii")


def encode_uu(data: bytes, name: str) -> bytes:
    lines = [f"begin 644 {name}\n".encode()]
    lines += [binascii.b2a_uu(data[i:i + 45]) for i in range(0, len(data), 45)]
    lines.append(b"`\nend\n")
    return _crlf(b"".join(lines))


_ENCODERS = {
    "base64": lambda data, name: encode_base64(data),
    "quoted-printable": lambda data, name: encode_qp_all(data),
    "x-uuencode": encode_uu,
}


def mail(
    text: str = "Hello,\n\nplease find the file attached.\n",
    attachments: Iterable[tuple[str, bytes]] = (),
    *,
    subject: str = "test message",
    encoding: str = "base64",
    boundary: str = "avgate-test-boundary-1",
    content_type: str = "application/octet-stream",
) -> bytes:
    """A MIME message (CRLF line ends): a text part plus ``attachments`` as (name, data).

    ``encoding`` is the attachments' Content-Transfer-Encoding: "base64",
    "quoted-printable" (every octet encoded) or "x-uuencode".
    """
    headers = (
        "From: sender@example.org\nTo: rcpt@example.com\n"
        f"Subject: {subject}\nDate: Mon, 1 Jan 2024 00:00:00 +0000\n"
        "Message-ID: <test@example.org>\nMIME-Version: 1.0\n"
    )
    items = list(attachments)
    if not items:
        return _crlf(f"{headers}Content-Type: text/plain; charset=us-ascii\n\n{text}".encode())
    out = [_crlf(f'{headers}Content-Type: multipart/mixed; boundary="{boundary}"\n\n'
                 f"This is a multi-part message in MIME format.\n\n--{boundary}\n"
                 f"Content-Type: text/plain; charset=us-ascii\n\n{text}\n".encode())]
    for name, data in items:
        out.append(_crlf(
            f"--{boundary}\nContent-Type: {content_type}; name=\"{name}\"\n"
            f"Content-Transfer-Encoding: {encoding}\n"
            f"Content-Disposition: attachment; filename=\"{name}\"\n\n".encode()))
        out.append(_ENCODERS[encoding](data, name))
    out.append(_crlf(f"--{boundary}--\n".encode()))
    return b"".join(out)


def make_message(subject: str = "hello", body: bytes = b"Hello there.\r\n",
                 attachment: bytes | None = None, name: str = "file.bin",
                 extra_headers: bytes = b"") -> bytes:
    """A small MIME message from alice@ to bob@example.test (CRLF line ends), optionally with
    one base64 attachment ``name``; the front-end tests' message (``body`` is sent verbatim,
    ``extra_headers`` go after the fixed ones). The Message-ID is derived from ``subject``."""
    head = (b"From: Alice <alice@example.test>\r\nTo: Bob <bob@example.test>\r\n"
            b"Subject: " + subject.encode() + b"\r\nMessage-ID: <" + subject.encode().replace(
                b" ", b"-") + b"@example.test>\r\nMIME-Version: 1.0\r\n" + extra_headers)
    if attachment is None:
        return head + b"Content-Type: text/plain\r\n\r\n" + body
    b64 = base64.encodebytes(attachment).replace(b"\n", b"\r\n")
    return (head + b'Content-Type: multipart/mixed; boundary="BOUND"\r\n\r\n'
            b"--BOUND\r\nContent-Type: text/plain\r\n\r\n" + body +
            b"--BOUND\r\nContent-Type: application/octet-stream\r\n"
            b'Content-Disposition: attachment; filename="' + name.encode() + b'"\r\n'
            b"Content-Transfer-Encoding: base64\r\n\r\n" + b64 + b"--BOUND--\r\n")


def nested_mail(inner: bytes) -> bytes:
    """A message that forwards ``inner`` as a message/rfc822 attachment."""
    head = _crlf(
        b"From: forwarder@example.org\nTo: rcpt@example.com\nSubject: Fwd: test\n"
        b"MIME-Version: 1.0\nContent-Type: multipart/mixed; boundary=\"outer-b\"\n\n"
        b"--outer-b\nContent-Type: text/plain\n\nForwarded message below.\n"
        b"--outer-b\nContent-Type: message/rfc822\nContent-Disposition: attachment\n\n")
    return head + inner + _crlf(b"\n--outer-b--\n")


def duplicate_boundary_mail(payload: bytes) -> bytes:
    """CVE-2024-28054: two boundary parameters; ``payload`` is a part only under the last.

    Python's email package uses the first boundary ("AAA", which never occurs), so it sees
    one opaque text body and no base64 attachment; parsers that take the last see it.
    """
    return _crlf(
        b"From: sender@example.org\nTo: rcpt@example.com\nSubject: invoice\n"
        b"MIME-Version: 1.0\n"
        b'Content-Type: multipart/mixed; boundary="AAA"; boundary="BBB"\n\n'
        b"--BBB\nContent-Type: text/plain\n\nSee attachment.\n"
        b"--BBB\nContent-Type: application/octet-stream\n"
        b"Content-Transfer-Encoding: base64\n"
        b'Content-Disposition: attachment; filename="invoice.com"\n\n'
        + encode_base64(payload) + b"--BBB--\n")


# -- archives -------------------------------------------------------------------------------
def make_zip(members: Iterable[tuple[str, bytes]],
             compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    """A zip with ``members`` written under their names exactly as given (``../`` kept)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression) as zf:
        for name, data in members:
            info = zipfile.ZipInfo(name, date_time=(2024, 1, 1, 0, 0, 0))
            info.compress_type = compression
            zf.writestr(info, data)
    return buf.getvalue()


def make_tar(members: Iterable[tuple[str, bytes]], compression: str = "") -> bytes:
    """A tar archive (``compression`` "", "gz", "bz2" or "xz")."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=f"w:{compression}") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 1704067200
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def make_7z(members: Iterable[tuple[str, bytes]]) -> bytes:
    import py7zr

    buf = io.BytesIO()
    with py7zr.SevenZipFile(buf, "w") as archive:
        for name, data in members:
            archive.writestr(data, name)
    return buf.getvalue()


def raw_zip(entries: Iterable[tuple[str, int, int, int, int, bytes]]) -> bytes:
    """A zip built byte by byte: (name, method, flags, crc, uncompressed size, stored data).

    For what zipfile cannot write: encrypted members, lying sizes, bombs.
    """
    local, central = [], []
    offset = 0
    count = 0
    for name, method, flags, crc, size, payload in entries:
        fname = name.encode()
        header = struct.pack("<4sHHHHHLLLHH", b"PK\x03\x04", 20, flags, method, 0, 0x5821,
                             crc, len(payload), size, len(fname), 0)
        local += [header, fname, payload]
        central.append(struct.pack("<4sHHHHHHLLLHHHHHLL", b"PK\x01\x02", 20, 20, flags,
                                   method, 0, 0x5821, crc, len(payload), size, len(fname),
                                   0, 0, 0, 0, 0, offset) + fname)
        offset += len(header) + len(fname) + len(payload)
        count += 1
    cd = b"".join(central)
    eocd = struct.pack("<4sHHHHLLH", b"PK\x05\x06", 0, 0, count, count, len(cd), offset, 0)
    return b"".join(local) + cd + eocd


def _zipcrypto(data: bytes, password: bytes, check_byte: int) -> bytes:
    """Traditional PKWARE encryption of a stored member (12-byte header + data)."""
    keys = [0x12345678, 0x23456789, 0x34567890]

    def crc_step(value: int, byte: int) -> int:
        # One step of the CRC-32 table update, expressed through zlib's pre/post inversion.
        return zlib.crc32(bytes([byte]), value ^ 0xFFFFFFFF) ^ 0xFFFFFFFF

    def update(byte: int) -> None:
        keys[0] = crc_step(keys[0], byte)
        keys[1] = ((keys[1] + (keys[0] & 0xFF)) * 134775813 + 1) & 0xFFFFFFFF
        keys[2] = crc_step(keys[2], keys[1] >> 24)

    for byte in password:
        update(byte)
    out = bytearray()
    for plain in bytes(range(11)) + bytes([check_byte]) + data:
        temp = (keys[2] | 2) & 0xFFFF
        out.append(plain ^ (((temp * (temp ^ 1)) >> 8) & 0xFF))
        update(plain)
    return bytes(out)


def encrypted_zip(name: str, data: bytes, password: bytes = ZIP_PASSWORD) -> bytes:
    """A zip whose one stored member is ZipCrypto-encrypted (readable with ``password``)."""
    crc = zlib.crc32(data)
    payload = _zipcrypto(data, password, crc >> 24)
    return raw_zip([(name, zipfile.ZIP_STORED, 0x1, crc, len(data), payload)])


def zip_bomb(size: int = BOMB_SIZE, declared: int | None = None) -> bytes:
    """A zip with one member of ``size`` zero bytes, deflated to about size/1000 bytes.

    Built without compressing ``size`` bytes: after a full flush the deflate state is reset,
    so one compressed MiB of zeros can be repeated. ``declared`` overrides the size in the
    headers (a lying header).
    """
    mib = bytes(1 << 20)
    block = zlib.compressobj(9, zlib.DEFLATED, -15)
    chunk = block.compress(mib) + block.flush(zlib.Z_FULL_FLUSH)
    blocks, rest = divmod(size, len(mib))
    tail = zlib.compressobj(9, zlib.DEFLATED, -15)
    stream = chunk * blocks + tail.compress(bytes(rest)) + tail.flush()
    crc = 0
    for _ in range(blocks):
        crc = zlib.crc32(mib, crc)
    crc = zlib.crc32(bytes(rest), crc)
    size_field = size if declared is None else declared
    return raw_zip([("zeros.bin", zipfile.ZIP_DEFLATED, 0, crc, size_field, stream)])


# -- the corpus -----------------------------------------------------------------------------
def _clean_mail() -> bytes:
    return mail("Hi,\n\nthe report is attached.\n",
                [("report.txt", CLEAN_TEXT), ("notes.zip", make_zip([("notes.txt", CLEAN_TEXT)]))])


@functools.cache
def corpus() -> list[Sample]:
    """Every sample, built once per process (about 0.1 s, mostly the bomb's CRC)."""
    infected, clean = ScanStatus.INFECTED, ScanStatus.CLEAN
    eicar_zip = make_zip([("eicar.com", EICAR)])
    uu_text = b"Hello,\r\n\r\nthe file follows.\r\n\r\n" + encode_uu(EICAR, "eicar.com")
    return [
        Sample("eicar.com", EICAR, infected, EICAR_NAME),
        Sample("marker.txt", b"header line\n" + MARKER + b"\ntrailer line\n", infected,
               MARKER_NAME),
        Sample("mail-base64.eml", mail(attachments=[("eicar.com", EICAR)]), infected,
               EICAR_NAME),
        # clamd: our test .hdb is an exact MD5 of the 68 bytes; ClamAV's QP decoder keeps
        # the final line break, so the hash differs (seen with clamd 1.4 in the test suite).
        Sample("mail-qp.eml", mail(attachments=[("eicar.com", EICAR)],
                                   encoding="quoted-printable"), infected, EICAR_NAME,
               clamd_expected=clean),
        Sample("mail-marker-qp.eml", mail(attachments=[("doc.txt", b"x " + MARKER + b" y")],
                                          encoding="quoted-printable"), infected, MARKER_NAME),
        Sample("mail-uuencode-body.eml", mail(uu_text.decode()), infected, EICAR_NAME),
        Sample("mail-x-uuencode.eml", mail(attachments=[("eicar.com", EICAR)],
                                           encoding="x-uuencode"), infected, EICAR_NAME),
        Sample("mail-nested-rfc822.eml", nested_mail(mail(attachments=[("eicar.com", EICAR)])),
               infected, EICAR_NAME),
        Sample("eicar.zip", eicar_zip, infected, EICAR_NAME),
        Sample("eicar-in-zip.zip", make_zip([("inner.zip", eicar_zip)]), infected, EICAR_NAME),
        Sample("eicar.tar.gz", make_tar([("dir/eicar.com", EICAR)], "gz"), infected,
               EICAR_NAME),
        Sample("eicar.7z", make_7z([("eicar.com", EICAR)]), infected, EICAR_NAME),
        Sample("eicar.com.gz", gzip.compress(EICAR, mtime=0), infected, EICAR_NAME),
        Sample("eicar.com.bz2", bz2.compress(EICAR), infected, EICAR_NAME),
        Sample("eicar.com.xz", lzma.compress(EICAR), infected, EICAR_NAME),
        Sample("eicar-encrypted.zip", encrypted_zip("eicar.com", EICAR),
               ScanStatus.UNKNOWN, None, clamd_expected=clean),
        Sample("zip-bomb.zip", zip_bomb(), ScanStatus.SKIPPED, None, clamd_expected=clean),
        # clamd takes the first boundary and never sees the part under the second: the
        # CVE-2024-28054 ambiguity that avgate's embedded engine scans both ways.
        Sample("mail-duplicate-boundary.eml", duplicate_boundary_mail(EICAR), infected,
               EICAR_NAME, clamd_expected=clean),
        Sample("zip-path-traversal.zip",
               make_zip([("../../evil.com", EICAR), ("/abs/evil.com", EICAR)]), infected,
               EICAR_NAME),
        Sample("clean.txt", CLEAN_TEXT, clean, None),
        Sample("clean.zip", make_zip([("readme.txt", CLEAN_TEXT)]), clean, None),
        Sample("clean.eml", _clean_mail(), clean, None),
    ]


def sample(name: str) -> Sample:
    """The corpus sample called ``name``."""
    for s in corpus():
        if s.name == name:
            return s
    raise KeyError(name)

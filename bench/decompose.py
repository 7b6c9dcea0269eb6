"""Decomposition cost per format, and the worst case per format under the default limits.

Runs :func:`avgate.content.decompose` in this process (no scan workers, no engines) on
generated samples of every format the decomposer opens:

* **typical**: the test corpus (``tests/corpus.py``: ``corpus()``, ``document_samples()``,
  ``container_samples()``, grouped by the format :func:`~avgate.content.filetype.detect`
  gives them; message/partial by name) plus a plain tar. Each format's samples are
  decomposed round-robin, every yielded item consumed, until ``--seconds`` have passed;
  the table gives wall and CPU (``time.process_time``: this process, all threads) µs per
  object, and the parts yielded per object.
* **hostile**: per format, samples built to run into the default ``[limits]``: more than
  ``max_files`` members, nesting deeper than ``max_recursion``, decompression bombs (ratio),
  many 1 MiB members that may each be inflated (the ratio floor) until ``max_scan_size``,
  and headers that declare huge sizes; also ``max_files - 10`` members (all extracted: the
  most work a container may cause without being refused). Each is decomposed
  ``--repeats`` times (least CPU kept); the table shows the costliest per format, what
  stopped it (the Problems' reasons) and the times of the others.

    .venv/bin/python bench/decompose.py [--quick] [--seconds 0.5] [--repeats 2]
                                        [--bomb-mib 200] [--only zip,pdf] [--no-cache]
                                        [--out FILE.jsonl]

The hostile samples are kept in ``bench/run/decompose-samples`` (git-ignored, about 175 MiB
per bomb size): building them takes about 30 s of CPU, mostly py7zr and OLE2.

Prints one Markdown table on stdout (the report shows it as is); one JSON line per
measurement goes to stderr as progress and, with ``--out``, to that file.
"""

from __future__ import annotations

import argparse
import base64
import bz2
import gzip
import hashlib
import json
import lzma
import struct
import sys
import time
import zipfile
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT))

from tests import corpus as K  # noqa: E402

from avgate.content import Part, Problem, decompose  # noqa: E402
from avgate.content.filetype import detect  # noqa: E402
from avgate.limits import DEFAULT_LIMITS, MiB  # noqa: E402

LIM = DEFAULT_LIMITS
Members = list[tuple[str, bytes]]
Builder = Callable[[Members], bytes]


# ----------------------------------------------------------------------------- builders
def pdf_streams(members: Members, *, length: int | None = None) -> bytes:
    """A PDF whose objects 4.. are one Flate stream per member (``length``: a lying
    /Length for all of them)."""
    streams = []
    for _, data in members:
        raw = zlib.compress(data)
        n = len(raw) if length is None else length
        streams.append(b"<< /Filter /FlateDecode /Length %d >>\nstream\n" % n + raw
                       + b"\nendstream")
    return K.make_pdf([b"<< /Type /Catalog /Pages 2 0 R >>", *K._PDF_PAGE, *streams])


def pdf_raw_stream(raw: bytes) -> bytes:
    """A PDF with one Flate stream whose (already deflated) bytes are ``raw``."""
    return K.make_pdf([b"<< /Type /Catalog /Pages 2 0 R >>", *K._PDF_PAGE,
                       b"<< /Filter /FlateDecode /Length %d >>\nstream\n" % len(raw) + raw
                       + b"\nendstream"])


def html_uris(members: Members) -> bytes:
    links = "".join(f'<a href="data:application/octet-stream;base64,'
                    f'{base64.b64encode(d).decode()}" download="{n}">{n}</a>\n'
                    for n, d in members)
    return f"<!DOCTYPE html>\n<html><body>\n{links}</body></html>\n".encode()


def rtf_objects(members: Members) -> bytes:
    """An RTF document with one Package object per member."""
    body = b""
    for name, data in members:
        one = K.rtf_object("Package", K.packager(name, data), split=False)
        start = one.index(b"{\\object")
        body += one[start:one.rindex(b"\\par}")]
    return b"{\\rtf1\\ansi\\deff0{\\fonttbl{\\f0 Arial;}}\\pard Files.\\par\r\n" + body + b"}\r\n"


def ole_streams(members: Members) -> bytes:
    return K.make_ole([("WordDocument", bytes(600)), *((n[:31], d) for n, d in members)])


def uu_text(members: Members) -> bytes:
    return b"Files follow.\r\n\r\n" + b"\r\n".join(K.encode_uu(d, n) for n, d in members)


def partial_set(members: Members) -> bytes:
    """message/partial: the members as one mail, split in two fragments."""
    return K.partial_set_mail(K.mail(attachments=members), total=2)


def single(fn: Callable[[bytes], bytes]) -> Builder:
    """A one-member format (gzip, bzip2, xz): the first member's data only."""
    return lambda members: fn(members[0][1])


@dataclass
class Fmt:
    name: str
    build: Builder | None  # members → container (for the files/nesting variants)
    many: bool = True  # has members of its own (else only nesting)
    under: bool = True  # also the max_files - 10 variant
    extra: Callable[[], list[tuple[str, bytes]]] = lambda: []  # format-specific hostiles
    tag: str = ""  # what else the samples depend on (the bomb size), for the cache


# ----------------------------------------------------------------------------- hostiles
ZERO_MIB = bytes(MiB)


def _deflate_repeat(size: int) -> tuple[bytes, int]:
    """Raw deflate of ``size`` zero bytes without compressing them all (full-flush reset)."""
    block = zlib.compressobj(9, zlib.DEFLATED, -15)
    chunk = block.compress(ZERO_MIB) + block.flush(zlib.Z_FULL_FLUSH)
    blocks, rest = divmod(size, MiB)
    tail = zlib.compressobj(9, zlib.DEFLATED, -15)
    return chunk * blocks + tail.compress(bytes(rest)) + tail.flush(), blocks


def _zeros_checksum(func: Callable[[bytes, int], int], start: int, size: int,
                    blocks: int) -> int:
    """crc32/adler32 of ``size`` zero bytes, a MiB at a time."""
    value = start
    for _ in range(blocks):
        value = func(ZERO_MIB, value)
    return func(bytes(size - blocks * MiB), value)


def gzip_bomb(size: int) -> bytes:
    stream, blocks = _deflate_repeat(size)
    crc = _zeros_checksum(zlib.crc32, 0, size, blocks)
    return (b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff" + stream
            + struct.pack("<LL", crc, size & 0xFFFFFFFF))


def zlib_bomb(size: int) -> bytes:
    stream, blocks = _deflate_repeat(size)
    return b"\x78\xda" + stream + struct.pack(">L", _zeros_checksum(zlib.adler32, 1, size,
                                                                      blocks))


def zip_of_mib_members(count: int) -> bytes:
    """``count`` members of 1 MiB of zeros each (under the ratio floor: all inflated)."""
    stream, _ = _deflate_repeat(MiB)
    crc = zlib.crc32(ZERO_MIB)
    return K.raw_zip([(f"z{i}.bin", zipfile.ZIP_DEFLATED, 0, crc, MiB, stream)
                      for i in range(count)])


def tar_declared() -> bytes:
    """A tar whose one member declares 8 GiB - 1 (octal size field) and holds 1 KiB."""
    tar = bytearray(K.make_tar([("big.bin", bytes(1024))]))
    tar[124:136] = b"77777777777\x00"
    tar[148:156] = b"        "
    tar[148:156] = b"%06o\x00 " % sum(tar[:512])
    return bytes(tar)


def rar5_declared() -> bytes:
    """A RAR 5 member that declares 1 TiB unpacked and holds 1 KiB stored."""
    data = bytes(1024)
    fields = (K._vint(2) + K._vint(0x2) + K._vint(len(data)) + K._vint(0x4) + K._vint(1 << 40)
              + K._vint(0x20) + struct.pack("<L", zlib.crc32(data)) + K._vint(0) + K._vint(0)
              + K._vint(7) + b"big.bin")
    return b"".join([b"Rar!\x1a\x07\x01\x00", K._rar5_block(K._vint(1) + K._vint(0) + K._vint(0)),
                     K._rar5_block(fields, data), K._rar5_block(K._vint(5) + K._vint(0)
                                                                + K._vint(0))])


def cpio_declared() -> bytes:
    """A newc cpio member whose size field says 4 GiB - 1; 1 KiB follows."""
    cpio = bytearray(K.make_cpio([("big.bin", bytes(1024))]))
    cpio[6 + 6 * 8:6 + 7 * 8] = b"FFFFFFFF"
    return bytes(cpio)


def lha_declared() -> bytes:
    """An -lh0- member that declares 4 GiB - 1 original (and packed) bytes."""
    body = (b"-lh0-" + struct.pack("<LLLBB", 0xFFFFFFFF, 0xFFFFFFFF, 0x58210000, 0x20, 0)
            + bytes([7]) + b"big.bin" + struct.pack("<H", 0))
    return bytes([len(body), sum(body) & 0xFF]) + body + bytes(1024) + b"\x00"


def arj_declared() -> bytes:
    basic = (bytes([30, 11, 1, 2, 0, 0, 0, 0])
             + struct.pack("<LLLL", 0x58210000, 0xFFFFFFF0, 0xFFFFFFF0, 0)
             + struct.pack("<HHH", 0, 0x20, 0) + b"big.bin\x00\x00")
    return K.make_arj_header()[:-4] + K._arj_header(basic) + bytes(1024) + b"\x60\xea\x00\x00"


def cab_declared() -> bytes:
    """A cabinet file entry of ~2 GiB (libarchive's most) in a folder of 1 KiB."""
    cab = bytearray(K.make_cab([("big.bin", bytes(1024))]))
    struct.pack_into("<L", cab, 44, 0x7FFF0000)
    return bytes(cab)


def tnef_declared() -> bytes:
    """attAttachData declaring 4 GiB - 16 bytes, 1 KiB present."""
    tnef = K.make_tnef([("a.bin", bytes(1024))])
    at = tnef.index(struct.pack("<BI", 2, 0x0006800F))
    return tnef[:at + 5] + struct.pack("<I", 0xFFFFFFF0) + tnef[at + 9:]


def rtf_declared() -> bytes:
    """An RTF OLE1 object whose native data declares 4 GiB - 16 bytes."""
    cls = b"Package\x00"
    ole1 = (struct.pack("<LL", 0x0501, 2) + struct.pack("<L", len(cls)) + cls
            + struct.pack("<LL", 0, 0) + struct.pack("<L", 0xFFFFFFF0) + bytes(1024))
    return (b"{\\rtf1\\ansi{\\object\\objemb{\\*\\objclass Package}{\\*\\objdata "
            + ole1.hex().encode() + b"}}\\par}\r\n")


def ole_declared() -> bytes:
    """An OLE2 stream whose directory entry says 4 GiB - 1 bytes."""
    ole = bytearray(K.make_ole([("WordDocument", bytes(600)), ("Data", bytes(8192))]))
    name = "Data".encode("utf-16-le")
    at = ole.index(name + b"\x00\x00")
    struct.pack_into("<Q", ole, at + 120, 0xFFFFFFFF)
    return bytes(ole)


def partial_many(total: int) -> bytes:
    inner = K.mail(attachments=[("a.bin", bytes(range(256)) * (total // 180 + 1))])
    return K.partial_set_mail(inner, total=total)


def partial_declared() -> bytes:
    """Two fragments of a set that declares a million."""
    inner = K.mail(attachments=[("a.bin", K.EICAR)])
    frags = K.partial_mails(inner, total=2)
    out = K._crlf(b"From: f@example.org\nTo: r@example.com\nSubject: fragments\n"
                  b'MIME-Version: 1.0\nContent-Type: multipart/mixed; boundary="frag-b"\n\n')
    for frag in frags:
        out += (b"--frag-b\r\nContent-Type: message/rfc822\r\n\r\n"
                + frag.replace(b"total=2", b"total=1000000") + b"\r\n")
    return out + b"--frag-b--\r\n"


def uu_big() -> bytes:
    """One uuencoded block as large as the root may be (24 MiB of text)."""
    return uu_text([("big.bin", bytes(range(256)) * (17 * MiB // 256))])


# ----------------------------------------------------------------------------- formats
def formats(bomb: int) -> list[Fmt]:
    def xz_multi() -> bytes:
        one = lzma.compress(bytes(16 * MiB))
        return one * streams

    def bz2_multi() -> bytes:
        one = bz2.compress(bytes(16 * MiB))
        return one * streams

    tag = f"bomb={bomb}"
    streams = max(bomb // (16 * MiB), 1)

    def zbomb() -> bytes:
        return K.zip_bomb(bomb)

    return [
        Fmt("MIME mail", lambda m: K.mail(attachments=m)),
        Fmt("zip", K.make_zip, tag=tag, extra=lambda: [
            (f"bomb ({bomb >> 20} MiB of zeros)", zbomb()),
            ("declared 4 GiB member", K.zip_bomb(2 * MiB, declared=0xFFFFFFFF)),
            ("120 x 1 MiB members (ratio floor)", zip_of_mib_members(120))]),
        Fmt("tar", K.make_tar, extra=lambda: [("declared 8 GiB member", tar_declared())]),
        Fmt("gzip", single(lambda d: gzip.compress(d, mtime=0)), many=False, tag=tag,
            extra=lambda: [(f"bomb ({bomb >> 20} MiB of zeros)", gzip_bomb(bomb))]),
        Fmt("bzip2", single(bz2.compress), many=False, tag=tag, extra=lambda: [
            (f"bomb ({streams} x 16 MiB of zeros)", bz2_multi())]),
        Fmt("xz", single(lzma.compress), many=False, tag=tag, extra=lambda: [
            (f"bomb ({streams} x 16 MiB of zeros)", xz_multi())]),
        Fmt("7z", K.make_7z, extra=lambda: [
            ("bomb (64 MiB of zeros)", K.make_7z([("zeros.bin", bytes(64 * MiB))])),
            ("120 x 1 MiB members (ratio floor)",
             K.make_7z([(f"z{i}.bin", ZERO_MIB) for i in range(120)]))]),
        Fmt("TNEF", lambda m: K.make_tnef(m), extra=lambda: [
            ("declared 4 GiB attachment", tnef_declared())]),
        Fmt("PDF", pdf_streams, tag=tag, extra=lambda: [
            (f"Flate bomb ({bomb >> 20} MiB of zeros)", pdf_raw_stream(zlib_bomb(bomb))),
            ("120 x 1 MiB streams (ratio floor)",
             pdf_streams([("z", ZERO_MIB)] * 120)),
            ("/Length 10^12", pdf_streams([("a", K.EICAR)], length=10**12))]),
        Fmt("HTML", html_uris, extra=lambda: [
            ("one 17 MiB data: URI", html_uris([("big.bin", bytes(range(256)) * (17 * MiB
                                                                              // 256))]))]),
        Fmt("message/partial", partial_set, many=False, extra=lambda: [
            (f"{LIM.max_files + 50} fragments", partial_many(LIM.max_files + 50)),
            ("total=1000000 declared", partial_declared())]),
        Fmt("RAR", K.make_rar5, extra=lambda: [("declared 1 TiB member", rar5_declared())]),
        Fmt("CAB", K.make_cab, extra=lambda: [
            ("declared 2 GiB member", cab_declared())]),
        Fmt("ISO 9660", K.make_iso),
        Fmt("cpio", K.make_cpio, extra=lambda: [("declared 4 GiB member", cpio_declared())]),
        Fmt("LHA", K.make_lha, extra=lambda: [("declared 4 GiB member", lha_declared())]),
        Fmt("ARJ", K.make_arj, extra=lambda: [("declared 4 GiB member", arj_declared())]),
        # tests/corpus.py's make_ole chains siblings (one long right-pointer list): olefile
        # cannot walk 10,000 of them (recursion), so under max_files reads the same
        Fmt("OLE2", ole_streams, under=False,
            extra=lambda: [("declared 4 GiB stream", ole_declared())]),
        Fmt("RTF", rtf_objects, extra=lambda: [("declared 4 GiB object", rtf_declared())]),
        Fmt("other (uuencode search)", uu_text, extra=lambda: [
            ("17 MiB uuencoded block", uu_big())]),
    ]


KIND_TO_FORMAT = {"mail": "MIME mail", "zip": "zip", "tar": "tar", "gzip": "gzip",
                  "bzip2": "bzip2", "xz": "xz", "7z": "7z", "tnef": "TNEF", "pdf": "PDF",
                  "html": "HTML", "rar": "RAR", "cab": "CAB", "iso9660": "ISO 9660",
                  "cpio": "cpio", "lha": "LHA", "arj": "ARJ", "ole2": "OLE2", "rtf": "RTF",
                  "other": "other (uuencode search)"}


def typical_samples() -> dict[str, list[tuple[str, bytes]]]:
    """The corpus samples by format (hostile ones, expected SKIPPED, left out)."""
    seen: dict[str, bytes] = {}
    for builder in (K.corpus, getattr(K, "document_samples", None),
                    getattr(K, "container_samples", None)):
        if builder is None:
            continue
        for s in builder():
            if s.expected.value != "skipped":
                seen.setdefault(s.name, s.data)
    seen["eicar.tar"] = K.make_tar([("dir/eicar.com", K.EICAR), ("readme.txt", K.CLEAN_TEXT)])
    out: dict[str, list[tuple[str, bytes]]] = {}
    for name, data in seen.items():
        fmt = "message/partial" if "partial" in name else KIND_TO_FORMAT[detect(data).value]
        out.setdefault(fmt, []).append((name, data))
    return out


CACHE = ROOT / "bench" / "run" / "decompose-samples"
CACHE_VERSION = 1  # bump when a builder changes


def cached_hostiles(fmt: Fmt) -> list[tuple[str, bytes]]:
    """:func:`hostiles`, kept under bench/run (git-ignored): some take seconds to build
    (py7zr writing 10,000 members, make_ole's sibling chains)."""
    key = hashlib.sha256(f"{CACHE_VERSION}/{fmt.name}/{LIM!r}/{fmt.tag}".encode()).hexdigest()
    index = CACHE / f"{key[:24]}.json"
    try:
        labels: list[str] = json.loads(index.read_text())
        return [(label, (CACHE / f"{key[:24]}-{i}.bin").read_bytes())
                for i, label in enumerate(labels)]
    except (OSError, ValueError):
        pass
    samples = hostiles(fmt)
    CACHE.mkdir(parents=True, exist_ok=True)
    for i, (_, data) in enumerate(samples):
        (CACHE / f"{key[:24]}-{i}.bin").write_bytes(data)
    index.write_text(json.dumps([label for label, _ in samples]))  # last: marks it complete
    return samples


def hostiles(fmt: Fmt) -> list[tuple[str, bytes]]:
    out: list[tuple[str, bytes]] = []
    if fmt.build is not None and fmt.many:
        # just over max_files (refused, maybe up front) and just under (all extracted)
        for n in (LIM.max_files + 50, LIM.max_files - 10)[:2 if fmt.under else 1]:
            out.append((f"{n} members",
                        fmt.build([(f"f{i}.txt", b"x%d" % i) for i in range(n)])))
    if fmt.build is not None:
        # max_recursion + 4 levels, or as many as fit max_file_size (RTF's hex doubles)
        data, depth = K.EICAR, 0
        while depth < LIM.max_recursion + 4:
            outer = fmt.build([(f"l{depth}.bin", data)])
            if len(outer) > LIM.max_file_size:
                break
            data, depth = outer, depth + 1
        fits = "" if depth == LIM.max_recursion + 4 else " (deepest under max_file_size)"
        out.append((f"nested {depth} deep{fits}", data))
    return out + fmt.extra()


# ----------------------------------------------------------------------------- measuring
def run_once(data: bytes, name: str) -> dict[str, Any]:
    parts = size = 0
    reasons: Counter[str] = Counter()
    limits: Counter[str] = Counter()
    error = ""
    wall, cpu = time.perf_counter(), time.process_time()
    try:
        for item in decompose(data, LIM, name):
            if isinstance(item, Part):
                parts += 1
                size += len(item.data)
            elif isinstance(item, Problem):
                (limits if item.limit is not None else reasons)[item.reason] += 1
    except Exception as exc:  # decompose must never raise: say so in the table
        error = f"RAISED {type(exc).__name__}: {str(exc)[:80]}"
    return {"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu,
            "parts": parts, "bytes_out": size, "limit_problems": dict(limits),
            "other_problems": dict(reasons), "error": error}


def typical(samples: list[tuple[str, bytes]], seconds: float) -> dict[str, Any]:
    for name, data in samples:  # warm-up: imports, first-use caches
        run_once(data, name)
    count = parts = 0
    wall, cpu = time.perf_counter(), time.process_time()
    while time.perf_counter() - wall < seconds or count < len(samples):
        name, data = samples[count % len(samples)]
        for item in decompose(data, LIM, name):
            parts += isinstance(item, Part)
        count += 1
    wall_s, cpu_s = time.perf_counter() - wall, time.process_time() - cpu
    return {"samples": len(samples), "objects": count,
            "mean_bytes": round(sum(len(d) for _, d in samples) / len(samples)),
            "wall_us_per_object": round(wall_s * 1e6 / count, 1),
            "cpu_us_per_object": round(cpu_s * 1e6 / count, 1),
            "parts_per_object": round(parts / count, 2)}


def stopped_by(rec: dict[str, Any]) -> str:
    if rec["error"]:
        return str(rec["error"])
    items = rec["limit_problems"] or rec["other_problems"]
    if not items:
        return "nothing (decomposed fully)"
    text = "; ".join(f"{r} [{n}x]" if n > 1 else r for r, n in items.items())
    return text.replace("|", "/")[:160]


def fmt_size(n: int) -> str:
    return f"{n / MiB:.1f} MiB" if n >= MiB else f"{n / 1024:.1f} KiB"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=0.5,
                    help="time per format for the typical samples (default 0.5)")
    ap.add_argument("--repeats", type=int, default=2,
                    help="decompositions of each hostile sample, least CPU kept (default 2)")
    ap.add_argument("--bomb-mib", type=int, default=200,
                    help="what the zip/gzip/bzip2/xz/PDF bombs inflate to (default 200)")
    ap.add_argument("--quick", action="store_true",
                    help="--seconds 0.1 --repeats 1 --bomb-mib 64")
    ap.add_argument("--only", default="", help="comma-separated format names (default all)")
    ap.add_argument("--out", type=Path, help="append the JSON lines here too")
    ap.add_argument("--no-cache", action="store_true",
                    help="build the hostile samples afresh (else kept in "
                         f"{CACHE.relative_to(ROOT)})")
    a = ap.parse_args(argv)
    if a.quick:
        a.seconds, a.repeats, a.bomb_mib = 0.1, 1, 64
    only = {x.strip().lower() for x in a.only.split(",") if x.strip()}
    started = time.perf_counter()
    typ = typical_samples()
    rows: list[dict[str, Any]] = []

    def emit(rec: dict[str, Any]) -> None:
        line = json.dumps(rec)
        print(line, file=sys.stderr, flush=True)  # progress; stdout is the table
        if a.out:
            with a.out.open("a") as f:
                f.write(line + "\n")

    for fmt in formats(a.bomb_mib * MiB):
        if only and fmt.name.lower() not in only:
            continue
        samples = typ.get(fmt.name, [])
        row: dict[str, Any] = {"format": fmt.name}
        if samples:
            row["typical"] = typical(samples, a.seconds)
            emit({"bench": "decompose", "kind": "typical", "format": fmt.name,
                  **row["typical"]})
        hostile = []
        for label, data in (hostiles(fmt) if a.no_cache else cached_hostiles(fmt)):
            runs = [run_once(data, label) for _ in range(max(a.repeats, 1))]
            best = min(runs, key=lambda r: r["cpu_s"])
            rec = {"bench": "decompose", "kind": "hostile", "format": fmt.name,
                   "sample": label, "input_bytes": len(data), "runs": len(runs),
                   **best, "wall_s": round(best["wall_s"], 4), "cpu_s": round(best["cpu_s"], 4)}
            emit(rec)
            hostile.append(rec)
            del data
        row["hostile"] = hostile
        rows.append(row)
    print(f"Decomposition in-process (`avgate.content.decompose`, default limits: "
          f"max_files {LIM.max_files}, max_recursion {LIM.max_recursion}, max_ratio "
          f"{LIM.max_ratio:g}, max_file_size {fmt_size(LIM.max_file_size)}, max_scan_size "
          f"{fmt_size(LIM.max_scan_size)}); no engines, no workers. *µs/object*: mean over "
          f"the corpus samples of that format, decomposed round-robin for ≥ {a.seconds:g} s "
          f"(wall; CPU = this process). *Worst hostile*: the hostile sample that took the most "
          f"CPU (its run with the least CPU of {a.repeats}; wall ms, CPU ms), the parts and "
          f"bytes it yielded, and the Problems that stopped it; *others*: the rest (wall ms). "
          f"Total run {time.perf_counter() - started:.0f} s.\n")
    print("| format | corpus samples (mean size) | parts/object | µs/object wall | "
          "µs/object CPU | worst hostile sample (input) | wall ms | CPU ms | "
          "parts out (bytes) | stopped by | other hostile samples: wall ms |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        t = row.get("typical")
        hs = sorted(row["hostile"], key=lambda r: -r["cpu_s"])
        cells = [row["format"]]
        if t:
            cells += [f"{t['samples']} ({fmt_size(t['mean_bytes'])})", f"{t['parts_per_object']}",
                      f"{t['wall_us_per_object']:.0f}", f"{t['cpu_us_per_object']:.0f}"]
        else:
            cells += ["—", "—", "—", "—"]
        if hs:
            w = hs[0]
            cells += [f"{w['sample']} ({fmt_size(w['input_bytes'])})",
                      f"{w['wall_s'] * 1e3:.1f}", f"{w['cpu_s'] * 1e3:.1f}",
                      f"{w['parts']} ({fmt_size(w['bytes_out'])})", stopped_by(w),
                      "; ".join(f"{r['sample']}: {r['wall_s'] * 1e3:.1f} "
                                f"({stopped_by(r)[:60]})"
                                for r in hs[1:]) or "—"]
        else:
            cells += ["—"] * 6
        print("| " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

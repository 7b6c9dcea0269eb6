"""Fuzz the PDF reader (avgate.content.pdf): mutated PDFs and PDF-shaped token soup."""

from __future__ import annotations

import zlib

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.corpus import (
    EICAR,
    lzw_encode,
    make_pdf,
    pdf_embedded_file,
    pdf_object_stream_attachment,
    pdf_stream,
    pdf_with_stream,
)
from tests.fuzz.documents import EXAMPLES, check, mutated

SEEDS = [
    pdf_with_stream(EICAR),
    pdf_with_stream(EICAR, b"[/ASCII85Decode /FlateDecode]", "a85-flate"),
    pdf_with_stream(EICAR, b"/LZWDecode", "lzw"),
    pdf_with_stream(EICAR, b"[/ASCIIHexDecode /RunLengthDecode]", "hex-rl"),
    pdf_with_stream(EICAR, b"/FlateDecode /DecodeParms << /Predictor 12 /Columns 4 >>",
                    "png-up"),
    pdf_embedded_file("eicar.com", EICAR),
    pdf_object_stream_attachment("eicar.com", EICAR),
    make_pdf([b"<< >>", pdf_stream(b"", EICAR)], trailer=b"/Encrypt 2 0 R /ID [<00><00>] "),
]
TOKENS = [b"obj", b"endobj", b"stream\n", b"\nendstream", b"<<", b">>", b"[", b"]", b"(",
          b")", b"\\", b"/Filter", b"/FlateDecode", b"/LZWDecode", b"/RunLengthDecode",
          b"/ASCII85Decode", b"/ASCIIHexDecode", b"/DecodeParms<</Predictor 15/Columns 3>>",
          b"/DecodeParms<</Predictor 12/Colors 32/BitsPerComponent 16/Columns 16777216>>",
          b"/Length 99999", b"/Length 1 0 R", b"/Type/ObjStm/N 9/First 3", b"/EF<</F 3 0 R>>",
          b"trailer<</Encrypt<</Filter/Standard/V 4/R 4/O<00>/U<00>/P -4>>>>", b"1 0 R",
          b"99 0 obj", zlib.compress(b"\0" * 100_000), lzw_encode(b"\0" * 5000), b"#2F", b"%"]
PIECES = st.lists(st.sampled_from(TOKENS) | st.binary(max_size=16), max_size=80)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated(SEEDS, TOKENS))
def test_mutated_pdfs(data: bytes) -> None:
    check(data)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(PIECES)
def test_token_soup(pieces: list[bytes]) -> None:
    check(b"%PDF-1.7\n" + b" ".join(pieces))

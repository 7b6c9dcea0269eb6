"""Fuzz the HTML reader (avgate.content.html): mutated pages and markup soup."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.corpus import EICAR, MARKER, html_percent_data_uri, html_smuggling
from tests.fuzz.documents import EXAMPLES, check, mutated

SEEDS = [html_smuggling(EICAR), html_percent_data_uri(MARKER),
         b"\xff\xfe" + "<html><a href='data:,x'>".encode("utf-16-le")]
TOKENS = [b"<!--", b"-->", b"&", b"&#", b"&#x", b";", b"&amp;", b"&colon;", b"data:",
          b"data:;base64,", b"data:text/html,", b"%", b"%4", b"=", b"<html>", b"<script>",
          b"'", b'"', b"\xc2\xa0", b"\xff", b"\r\n", b"\t"]
PIECES = st.lists(st.sampled_from(TOKENS) | st.text(max_size=8).map(str.encode), max_size=80)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated(SEEDS, TOKENS))
def test_mutated_pages(data: bytes) -> None:
    check(data)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(PIECES)
def test_markup_soup(pieces: list[bytes]) -> None:
    check(b"<html>" + b"".join(pieces))

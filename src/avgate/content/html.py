"""HTML: a normalised copy for body signatures, and ``data:`` URIs decoded (HTML smuggling).

The normalised copy (path ``.../html-normalised``) is what clamd's HTML normaliser makes
for its HTML signatures: comments removed, character references (``&#x41;``, ``&lt;``,
``&amp``) decoded, ASCII lower-cased, every run of white space (``&nbsp;`` included) one
space. A signature over text that the page spells with entities, splits with comments or
writes in mixed case matches the copy, not the page as sent.

``data:`` URIs (RFC 2397), in attributes and in script strings, are decoded as a browser
does (character references first, then percent-decoding, then forgiving base64 when the
URI says ``;base64``), each into a part of its own (``.../data-uri1``): a page that builds
a download from a ``data:`` URI delivers that file without it ever being an attachment.
The copy leaves the payloads of ``data:`` URIs out (they are scanned decoded), so the copy
decomposed in turn finds nothing more. A quoted string of 128 or more base64 characters and
nothing else (what a page passes to ``atob()`` to build a download as a Blob) is decoded
into a part too (``.../base64-string1``).

Every part is at most as large as the page (decoding never expands here), the work is a
few linear passes (regexes without nested repetition, ``str.find`` for comments), and the
count of parts is bounded by ``max_files`` in :func:`avgate.content.decompose`.
"""

from __future__ import annotations

import binascii
import html
import itertools
import re
from urllib.parse import unquote_to_bytes

from . import Budget, Children, Part, join_path
from .mime import uuencoded_parts

__all__ = ["NORMALISED", "decode_data_uri", "html_parts", "normalise", "split_comments"]

NORMALISED = "html-normalised"
_BOMS = ((b"\xef\xbb\xbf", "utf-8"), (b"\xff\xfe", "utf-16-le"), (b"\xfe\xff", "utf-16-be"))

# RFC 2397 ``data:[<mediatype>][;param]*,<data>``; not preceded by a scheme character
# ("metadata:" is no URI). The payload runs to a quote, "<", ">", a backtick, a backslash,
# ")", a space or a form feed: what ends an attribute value, a script string or a CSS
# url(). Tabs and line breaks inside are allowed (the URL parser drops them).
# The "d" first and the look-behind after it: the regex engine skips to each "d" quickly.
_DATA_URI = re.compile(
    r"d(?<![\w.+-]d)ata:([^,;\"'<>\s]{0,256})((?:;[^,;\"'<>\s]{0,256}){0,16}),"
    r"([^\"'<>`\\) \x0c]*)", re.IGNORECASE)
# A script string that is nothing but base64, long enough to be a file: what a smuggling
# page hands to atob() to build a Blob (no data: URI involved). Decoded as well.
_BASE64_STRING = re.compile(r"([\"'`])([A-Za-z0-9+/]{128,}+={0,2}+)\1")
_TAB_OR_NEWLINE = re.compile(r"[\t\r\n]+")
_ASCII_WHITESPACE = re.compile(rb"[\t\n\x0c\r ]+")


def _text(data: bytes) -> str:
    """The page as text: UTF-16 by its BOM, else UTF-8 with undecodable bytes kept as they
    are (surrogate escapes), so that the copy has the page's bytes where it has no text."""
    for bom, encoding in _BOMS:
        if data.startswith(bom):
            return data[len(bom):].decode(encoding, "surrogateescape" if encoding == "utf-8"
                                          else "replace")
    return data.decode("utf-8", "surrogateescape")


def split_comments(text: str) -> tuple[str, list[str]]:
    """``text`` without ``<!-- ... -->``, and the comments' contents (an unclosed comment
    runs to the end, as browsers read it). One ``str.find`` per comment: linear."""
    out: list[str] = []
    comments: list[str] = []
    pos = 0
    while (start := text.find("<!--", pos)) >= 0:
        out.append(text[pos:start])
        end = text.find("-->", start + 4)
        if end < 0:
            comments.append(text[start + 4:])
            return "".join(out), comments
        comments.append(text[start + 4:end])
        pos = end + 3
    out.append(text[pos:])
    return "".join(out), comments


def _fold(text: str) -> bytes:
    """Lower-cased (ASCII), every run of blanks one space (``&nbsp;`` one too)."""
    text = text.replace("\xa0", " ")  # a blank on the screen, so one here
    folded = _ASCII_WHITESPACE.sub(b" ", text.encode("utf-8", "surrogateescape").lower())
    return folded.strip(b" ")


def normalise(text: str) -> bytes:
    """The normalised copy of a page (see the module text)."""
    plain = html.unescape(split_comments(text)[0])
    return _fold(_DATA_URI.sub(lambda m: f"data:{m.group(1)}{m.group(2)},", plain))


def decode_data_uri(params: str, payload: str) -> bytes | None:
    """A ``data:`` URI's bytes (fetch's data: URL processor), None when undecodable."""
    text = _TAB_OR_NEWLINE.sub("", payload).encode("utf-8", "surrogateescape")
    raw = unquote_to_bytes(text)
    if ";base64" not in params.lower().replace(" ", ""):
        return raw
    raw = _ASCII_WHITESPACE.sub(b"", raw).rstrip(b"=")
    if len(raw) % 4 == 1:
        return None
    try:
        return binascii.a2b_base64(raw + b"=" * (-len(raw) % 4))
    except binascii.Error:
        return None


def html_parts(part: Part, budget: Budget) -> Children:
    """The page's ``data:`` URIs decoded, then its normalised copy (when it differs).

    Character references are decoded before ``data:`` URIs are looked for, as in attribute
    values; comments are searched too (Internet Explorer ran conditional comments), but
    are not in the copy. One pass finds the URIs and cuts their payloads from the copy.
    """
    depth = part.depth + 1
    without, comments = split_comments(_text(part.data))
    plain = html.unescape(without)
    pieces: list[str] = []
    last = index = 0
    for text, in_copy in itertools.chain([(plain, True)],
                                         ((html.unescape(c), False) for c in comments)):
        for match in _DATA_URI.finditer(text):
            if in_copy:
                pieces.append(plain[last:match.start(3)])
                last = match.end(3)
            decoded = decode_data_uri(match.group(2), match.group(3))
            if decoded:
                index += 1
                yield Part(join_path(part.path, f"data-uri{index}"), decoded, depth)
                if budget.stopped:
                    return
    pieces.append(plain[last:])
    for number, match in enumerate(_BASE64_STRING.finditer(without), 1):
        decoded = decode_data_uri(";base64", match.group(2))
        if decoded:
            yield Part(join_path(part.path, f"base64-string{number}"), decoded, depth)
            if budget.stopped:
                return
    normalised = _fold("".join(pieces))
    if normalised != part.data:
        yield Part(join_path(part.path, NORMALISED), normalised, depth)
    # What any other text leaf gets: a "<p>" at the top must not hide a uuencoded file.
    yield from uuencoded_parts(part, budget)

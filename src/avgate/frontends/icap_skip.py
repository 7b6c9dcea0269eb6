"""ICAP ``skip_content_types``: which objects may go unscanned.

``skip_content_types``: an object is left unscanned (``204``, logged as ``icap-skip``; after
the preview when there is one) only if its Content-Type matches a pattern **and** its first
bytes carry that media type's signature (:data:`MEDIA_SIGNATURES`: PNG, JPEG, GIF, WebP,
ICO, AVIF, MP4/QuickTime, WebM/Matroska, Ogg, MP3, FLAC, WAV, AVI, FLV) **and** it is not
a download (``Content-Disposition: attachment``). The origin chooses the Content-Type, so a
label alone is never trusted: EICAR served as ``image/png`` is scanned, and so is every type
without a known signature (SVG carries scripts). What remains unscanned is a real image or
video with something appended after its signature (a polyglot), so the option trades
detection for speed and is off by default.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence

from ..protocols import icap as proto

#: Signatures of the media types ``skip_content_types`` may skip: per type, alternatives,
#: each a tuple of (offset, bytes) that must all match. A type not listed is always scanned.
MEDIA_SIGNATURES: dict[str, tuple[tuple[tuple[int, bytes], ...], ...]] = {}


def _signatures(types: str, *alternatives: tuple[tuple[int, bytes], ...]) -> None:
    for media in types.split():
        MEDIA_SIGNATURES[media] = alternatives


_signatures("image/png image/apng", ((0, b"\x89PNG\r\n\x1a\n"),))
_signatures("image/jpeg image/pjpeg image/jpg", ((0, b"\xff\xd8\xff"),))
_signatures("image/gif", ((0, b"GIF87a"),), ((0, b"GIF89a"),))
_signatures("image/webp", ((0, b"RIFF"), (8, b"WEBPVP8")))
_signatures("image/x-icon image/vnd.microsoft.icon", ((0, b"\x00\x00\x01\x00"),))
_signatures("image/avif", ((4, b"ftypavi"),))
_signatures("video/mp4 audio/mp4 video/quicktime video/3gpp video/x-m4v audio/x-m4a",
            ((4, b"ftyp"),))
_signatures("video/webm audio/webm video/x-matroska audio/x-matroska",
            ((0, b"\x1a\x45\xdf\xa3"),))
_signatures("video/ogg audio/ogg application/ogg", ((0, b"OggS"),))
_signatures("audio/mpeg audio/mp3", ((0, b"ID3"),), ((0, b"\xff\xfb"),), ((0, b"\xff\xf3"),),
            ((0, b"\xff\xf2"),))
_signatures("audio/flac audio/x-flac", ((0, b"fLaC"),))
_signatures("audio/wav audio/x-wav audio/wave audio/vnd.wave", ((0, b"RIFF"), (8, b"WAVE")))
_signatures("video/x-msvideo video/avi video/msvideo", ((0, b"RIFF"), (8, b"AVI ")))
_signatures("video/x-flv", ((0, b"FLV\x01"),))
#: Bytes of the body's start kept for the signature check.
SNIFF_BYTES = 16


def media_agrees(media: str, head: bytes) -> bool:
    """Whether ``head`` (the first bytes of the body) carries a signature of ``media``."""
    return any(all(head[off:off + len(sig)] == sig for off, sig in alternative)
               for alternative in MEDIA_SIGNATURES.get(media, ()))


def claimed_type(http: bytes, patterns: Sequence[str]) -> str:
    """The media type an HTTP head claims when ``patterns`` (``skip_content_types``) may
    skip it ("" = scan); the body's first bytes must still agree (:func:`media_agrees`)."""
    if not patterns or not http:
        return ""
    try:
        head = proto.HttpHead.parse(http)
    except proto.IcapProtocolError:
        return ""
    media = head.media_type
    if not media or not any(fnmatch.fnmatchcase(media, p) for p in patterns):
        return ""
    if head.headers.get("content-disposition").strip().lower().startswith("attachment"):
        return ""  # a download: whatever it is called, the user may open it elsewhere
    return media

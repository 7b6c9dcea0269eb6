"""FTP control-channel codec (RFC 959, RFC 2428 EPRT/EPSV), sans-IO: bytes in, events out.

:class:`CommandReader` turns the client's bytes into :class:`Command` events, and
:class:`ReplyReader` the server's into :class:`Reply` events (multi-line replies joined: a
``123-`` first line runs to the ``123 `` line). Both refuse a line longer than ``MAX_LINE``
and a reply of more than ``MAX_REPLY_LINES`` lines with :class:`FtpError`, before buffering
more. The address grammar of PASV/EPSV replies and PORT/EPRT commands is parsed and built
here, with every number range-checked (a port of 0 or 65536, an octet of 256 is an error, not
a wrap-around).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

MAX_LINE = 4096  # bytes of one command or reply line, CRLF included
MAX_REPLY_LINES = 1000  # lines of one multi-line reply (a FEAT or HELP list)
_VERB = re.compile(rb"^[A-Za-z]{3,4}$")
_PASV = re.compile(r"\((\d{1,3}),(\d{1,3}),(\d{1,3}),(\d{1,3}),(\d{1,3}),(\d{1,3})\)")
_EPSV = re.compile(r"\((.)\1\1(\d{1,5})\1\)")


class FtpError(ValueError):
    """Bytes that are not FTP (or exceed a limit); the message is safe to log."""


@dataclass(frozen=True, slots=True)
class Command:
    verb: str  # upper-case, 3-4 letters
    arg: str  # "" when none; as sent (UTF-8, RFC 2640; undecodable bytes kept as escapes)

    @property
    def line(self) -> bytes:
        """The command as it goes on to the server."""
        text = f"{self.verb} {self.arg}" if self.arg else self.verb
        return text.encode("utf-8", "surrogateescape") + b"\r\n"

    def shown(self) -> str:
        """For logs: PASS and ACCT arguments are never shown."""
        if self.verb in ("PASS", "ACCT"):
            return f"{self.verb} ***"
        return f"{self.verb} {self.arg}"[:200] if self.arg else self.verb


@dataclass(frozen=True, slots=True)
class Reply:
    code: int
    lines: tuple[bytes, ...]  # raw, CRLF included

    @property
    def raw(self) -> bytes:
        return b"".join(self.lines)

    @property
    def text(self) -> str:
        """The reply text without codes (all lines joined by a space)."""
        parts = [ln.rstrip(b"\r\n").decode("utf-8", "replace") for ln in self.lines]
        return " ".join(p[4:] if p[:3].isdigit() else p.strip() for p in parts)

    @property
    def preliminary(self) -> bool:
        return 100 <= self.code < 200

    @property
    def positive(self) -> bool:
        return 200 <= self.code < 400


class _Lines:
    def __init__(self) -> None:
        self._buf = bytearray()

    def _feed(self, data: bytes) -> list[bytes]:
        self._buf += data
        out: list[bytes] = []
        while True:
            end = self._buf.find(b"\n")
            if end < 0:
                if len(self._buf) > MAX_LINE:
                    raise FtpError(f"line longer than {MAX_LINE} bytes")
                return out
            if end + 1 > MAX_LINE:
                raise FtpError(f"line longer than {MAX_LINE} bytes")
            out.append(bytes(self._buf[:end + 1]))
            del self._buf[:end + 1]


class CommandReader(_Lines):
    """Client bytes → commands."""

    def feed(self, data: bytes) -> list[Command]:
        return [parse_command(line) for line in self._feed(data)]


def parse_command(line: bytes) -> Command:
    body = line.rstrip(b"\r\n")
    if b"\r" in body or b"\0" in body:
        raise FtpError("CR or NUL inside a command line")
    verb, _, arg = body.partition(b" ")
    if not _VERB.match(verb):
        raise FtpError("not an FTP command")
    return Command(verb.decode().upper(), arg.decode("utf-8", "surrogateescape"))


class ReplyReader(_Lines):
    """Server bytes → replies (a multi-line reply is one event)."""

    def __init__(self) -> None:
        super().__init__()
        self._pending: list[bytes] = []
        self._code = b""

    def feed(self, data: bytes) -> list[Reply]:
        out: list[Reply] = []
        for line in self._feed(data):
            if not self._pending:
                if len(line) < 4 or not line[:3].isdigit() or line[3:4] not in (b" ", b"-",
                                                                                  b"\r", b"\n"):
                    raise FtpError("not an FTP reply")
                if line[3:4] != b"-":
                    out.append(Reply(int(line[:3]), (line,)))
                    continue
                self._code = line[:3]
                self._pending = [line]
                continue
            self._pending.append(line)
            if len(self._pending) > MAX_REPLY_LINES:
                raise FtpError(f"reply longer than {MAX_REPLY_LINES} lines")
            if line[:3] == self._code and line[3:4] in (b" ", b"\r", b"\n"):
                out.append(Reply(int(self._code), tuple(self._pending)))
                self._pending = []
        return out


def reply(code: int, text: str) -> bytes:
    """One reply line (CR/LF in ``text`` cannot split it)."""
    clean = " ".join(text.replace("\r", " ").replace("\n", " ").split())
    return f"{code} {clean}\r\n".encode("utf-8", "replace")


def _port(hi: int, lo: int) -> int:
    if not (0 <= hi <= 255 and 0 <= lo <= 255):
        raise FtpError("port byte out of range")
    port = hi * 256 + lo
    if port == 0:
        raise FtpError("port 0")
    return port


def parse_pasv(text: str) -> tuple[str, int]:
    """The (host, port) of a 227 reply's ``(h1,h2,h3,h4,p1,p2)``."""
    m = _PASV.search(text)
    if not m:
        raise FtpError("227 reply without an address")
    nums = [int(x) for x in m.groups()]
    if any(n > 255 for n in nums):
        raise FtpError("address byte out of range")
    return ".".join(map(str, nums[:4])), _port(nums[4], nums[5])


def parse_epsv(text: str) -> int:
    """The port of a 229 reply's ``(|||port|)``."""
    m = _EPSV.search(text)
    if not m:
        raise FtpError("229 reply without a port")
    port = int(m.group(2))
    if not 0 < port < 65536:
        raise FtpError("port out of range")
    return port


def format_pasv(host: str, port: int) -> bytes:
    ip = ipaddress.ip_address(host)
    if ip.version != 4:
        raise FtpError("PASV needs an IPv4 address (use EPSV)")
    nums = [*str(ip).split("."), str(port >> 8), str(port & 0xFF)]
    return reply(227, f"Entering Passive Mode ({','.join(nums)}).")


def format_epsv(port: int) -> bytes:
    return reply(229, f"Entering Extended Passive Mode (|||{port}|)")


def parse_port(arg: str) -> tuple[str, int]:
    """PORT h1,h2,h3,h4,p1,p2 → (host, port)."""
    parts = arg.strip().split(",")
    if len(parts) != 6 or not all(p.isdigit() and len(p) <= 3 for p in parts):
        raise FtpError("PORT needs h1,h2,h3,h4,p1,p2")
    nums = [int(p) for p in parts]
    if any(n > 255 for n in nums[:4]):
        raise FtpError("address byte out of range")
    return ".".join(map(str, nums[:4])), _port(nums[4], nums[5])


def parse_eprt(arg: str) -> tuple[str, int]:
    """EPRT |1|h.o.s.t|port| or |2|v6::addr|port| → (host, port)."""
    arg = arg.strip()
    if len(arg) < 7:
        raise FtpError("EPRT needs |proto|address|port|")
    d = arg[0]
    fields = arg.split(d)
    if len(fields) != 5 or fields[0] or fields[4] or d.isalnum():
        raise FtpError("EPRT needs |proto|address|port|")
    proto, host, port_text = fields[1], fields[2], fields[3]
    try:
        ip = ipaddress.ip_address(host)
    except ValueError as exc:
        raise FtpError("EPRT address is not an IP address") from exc
    if (proto, ip.version) not in (("1", 4), ("2", 6)):
        raise FtpError("EPRT protocol does not match the address")
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise FtpError("EPRT port out of range")
    return str(ip), int(port_text)

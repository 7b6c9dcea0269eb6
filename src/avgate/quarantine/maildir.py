"""``[quarantine] deliver_to_maildir``: a copy of each held message in the recipient's folder.

IndiMail's ``QUARANTINE`` and Oracle's per-user quarantine put an infected message where its
recipient can see it (a ``.Quarantine/`` folder of their Maildir) instead of only in an
administrator's store. avgate keeps the record in the store as always (the store is the
authority: release, reports, purge) and, when ``deliver_to_maildir`` is set, also writes the
message into the folder the template names for each recipient::

    deliver_to_maildir = "/var/vmail/{domain}/{local}/Maildir/.Quarantine"

Placeholders: ``{recipient}`` (``local@domain``), ``{local}``, ``{domain}`` (lower-cased).
Addresses come from the sender's side of the world, so a recipient whose local part or
domain could leave the template's directory (``/``, ``..``, a leading dot, controls, NUL) is
never delivered to. The folder is created (Maildir++: ``tmp/``, ``new/``, ``cur/`` and a
``maildirfolder`` file, mode 0700) only when its parent exists: a recipient without a
mailbox here (a forward, a remote address) is skipped, not an error. Delivery is the Maildir
protocol: a unique name in ``tmp/``, fsync, rename into ``new/``; files are created with
``O_EXCL | O_NOFOLLOW`` and ``maildir_mode`` (default 0600). The folder, ``tmp/`` and ``new/``
are opened through directory descriptors with ``O_NOFOLLOW``, so a symlink in their place is
refused, never followed. Run avgate as a user no more privileged than the mailbox owners
(never as root): the mailbox itself is the owner's to point anywhere. The copy starts with
``X-Avgate-Quarantine-ID: <id>`` so the user can ask for a release by id.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from itertools import count
from pathlib import Path
from typing import BinaryIO

_CHUNK = 1 << 16
#: placeholders a template may use
PLACEHOLDERS = ("recipient", "local", "domain")
# an RFC 5322 dot-atom local part (no quoted strings), and a DNS name: nothing that can
# name another directory once put into a path
_LOCAL_RE = re.compile(r"^[A-Za-z0-9!#$%&'*+=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+=?^_`{|}~-]+)*$")
_DOMAIN_RE = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9-]{0,62})(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]"
                        r"{0,62}))*\.?$")
_seq = count()


class UnsafeRecipient(ValueError):
    """A recipient that cannot be put into a path."""


def check_template(template: str) -> str:
    """A valid template: absolute, known placeholders only (ValueError otherwise)."""
    if not template:
        return template
    if not template.startswith("/"):
        raise ValueError(f"deliver_to_maildir must be an absolute path, got {template!r}")
    try:
        template.format(recipient="a@b", local="a", domain="b")
    except (KeyError, IndexError, ValueError) as exc:
        raise ValueError(f"deliver_to_maildir {template!r}: unknown or broken placeholder "
                         f"{exc} (use {', '.join('{' + p + '}' for p in PLACEHOLDERS)})"
                         ) from None
    return template


def split_recipient(recipient: str) -> tuple[str, str]:
    """(local, domain) of a recipient that is safe in a path; UnsafeRecipient otherwise."""
    address = recipient.strip()
    if address.startswith("<") and address.endswith(">"):
        address = address[1:-1]
    local, at, domain = address.rpartition("@")
    if not at:
        local, domain = address, ""
    if not _LOCAL_RE.match(local) or (domain and not _DOMAIN_RE.match(domain)):
        raise UnsafeRecipient(f"recipient {recipient!r} cannot name a Maildir folder")
    return local, domain.rstrip(".").lower()


@dataclass(frozen=True, slots=True)
class MaildirDelivery:
    """Writes held messages into the recipients' Maildir folders (see the module doc)."""

    template: str
    mode: int = 0o600

    def folder_for(self, recipient: str) -> Path:
        """The folder of ``recipient`` (UnsafeRecipient for an address unfit for a path)."""
        local, domain = split_recipient(recipient)
        return Path(self.template.format(recipient=f"{local}@{domain}" if domain else local,
                                         local=local, domain=domain))

    def deliver_to(self, folder: Path, source: Path | Callable[[], BinaryIO],
                   record_id: str) -> Path | None:
        """Copy ``source`` (a file, or a function opening the content) into ``folder`` (a
        :meth:`folder_for` result); None when the folder's parent (the mailbox) does not
        exist. Raises OSError.

        Everything below the mailbox is opened through directory descriptors with
        ``O_NOFOLLOW``: a folder, ``tmp`` or ``new`` swapped for a symlink (even between
        our check and our write) makes the delivery fail, never write elsewhere."""
        if not folder.parent.is_dir():
            return None
        name = _unique_name()
        folder_fd = _open_dir(str(folder), None)
        try:
            for sub in ("tmp", "new", "cur"):
                _make_dir(sub, folder_fd)
            if folder.name.startswith("."):  # Maildir++: a folder, not a mailbox
                os.close(os.open("maildirfolder", os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW,
                                 0o600, dir_fd=folder_fd))
            tmp_fd = _open_dir("tmp", folder_fd)
            new_fd = _open_dir("new", folder_fd)
            try:
                self._write(tmp_fd, name, source, record_id)
                try:
                    os.rename(name, name, src_dir_fd=tmp_fd, dst_dir_fd=new_fd)
                except OSError:
                    os.unlink(name, dir_fd=tmp_fd)
                    raise
            finally:
                os.close(tmp_fd)
                os.close(new_fd)
        finally:
            os.close(folder_fd)
        return folder / "new" / name

    def _write(self, dir_fd: int, name: str, source: Path | Callable[[], BinaryIO],
               record_id: str) -> None:
        """``X-Avgate-Quarantine-ID`` and the message into a new file ``name`` (fsynced)."""
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, self.mode,
                     dir_fd=dir_fd)
        try:
            opened = open(source, "rb") if isinstance(source, Path) else source()
            with os.fdopen(fd, "wb") as out, opened as src:
                first = src.read(_CHUNK)
                eol = b"\r\n" if first.split(b"\n", 1)[0].endswith(b"\r") else b"\n"
                out.write(b"X-Avgate-Quarantine-ID: " + record_id.encode("ascii") + eol)
                while first:
                    out.write(first)
                    first = src.read(_CHUNK)
                out.flush()
                os.fchmod(out.fileno(), self.mode)  # the umask does not decide
                os.fsync(out.fileno())
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(name, dir_fd=dir_fd)
            raise


def _make_dir(name: str, dir_fd: int | None) -> None:
    with contextlib.suppress(FileExistsError):
        os.mkdir(name, 0o700, dir_fd=dir_fd)


def _open_dir(name: str, dir_fd: int | None) -> int:
    """Create (0700) and open a directory; a symlink in its place is refused (ELOOP)."""
    _make_dir(name, dir_fd)
    try:
        return os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise OSError(exc.errno, f"{name} is not a directory (a symlink is refused)"
                          ) from None
        raise


def _unique_name() -> str:
    """A Maildir file name: ``sec.M<usec>P<pid>Q<n>.<host>`` (unique per process and host)."""
    now = time.time()
    host = socket.gethostname().replace("/", "\\057").replace(":", "\\072")
    return f"{int(now)}.M{int(now * 1e6) % 1_000_000}P{os.getpid()}Q{next(_seq)}.{host}"

"""What a part *is*, from its bytes: the types banned-file rules match (``detected_type``).

:func:`identify` returns every type name that applies (a macro-enabled Word 97 document is
``{"ole2", "office-macro"}``), or an empty set. Like :mod:`.filetype` it looks at fixed
offsets: the first bytes, a header field or two, and for disk images the few places their
signatures live, so it costs about the same for 1 KB and 25 MB. Two checks read more, both
bounded by the part itself and run only when the magic says so: an OLE2 compound file's
directory (for the MSI class id and the VBA storages; each sector read once at most) and,
for a zip, a ``bytes.find`` for the OOXML parts list and ``vbaProject.bin``.

Types (:data:`TYPES`):

``pe``            Windows PE executable or DLL (``MZ`` whose ``e_lfanew`` points at ``PE\\0\\0``)
``elf``           ELF executable, shared object or core (``\\x7fELF``, valid class and order)
``macho``         Mach-O, either byte order, 32/64-bit, and universal ("fat") binaries
``msi``           Windows Installer package, patch or transform (OLE2 with the MSI class ids)
``ole2``          any OLE2 compound file (Office 97-2003, MSI, Outlook .msg, ...)
``office-macro``  OLE2 with a VBA project, or OOXML (zip) with ``vbaProject.bin``
``ooxml``         Office Open XML (a zip with ``[Content_Types].xml``)
``iso``           ISO 9660 / UDF image (``CD001`` / ``BEA01`` / ``NSR0x`` at 32 KiB)
``img``           raw disk image with a FAT/exFAT/NTFS boot sector, VHD, VHDX or DMG
``lnk``           Windows shortcut (shell link header and class id)
``onenote``       OneNote section file (``.one``)
``hta``           HTML application (``<hta:application``)
``wsf``           Windows Script File (an XML ``<job>`` / ``<package>`` with ``<script>``)
``js``            JScript for Windows Script Host (``ActiveXObject``, ``WScript.*`` object
                  calls) or script encoded with ``screnc`` (``#@~^``, also ``vbs``)
``vbs``           VBScript for Windows Script Host (``CreateObject`` with ``WScript`` or
                  ``Dim``/``Sub`` statements)

The script types (``hta``, ``wsf``, ``js``, ``vbs``) are heuristics over the first
:data:`SCRIPT_PROBE` bytes of text (no NUL byte there); ``scripts=False`` leaves them out
(the banned-type check does so for parts without a file name: a mail body quoting a script
runs nowhere). Never raises for hostile input.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Callable
from typing import Final

__all__ = ["SCRIPT_PROBE", "TYPES", "identify"]

TYPES: Final = ("pe", "elf", "macho", "msi", "ole2", "office-macro", "ooxml", "iso", "img",
                "lnk", "onenote", "hta", "wsf", "js", "vbs")

#: bytes of a text part the script heuristics look at
SCRIPT_PROBE = 64 * 1024

_OLE2_MAGIC = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"
# Windows Installer: package {000C1084-...}, patch {000C1086-...}, transform {000C1082-...},
# as stored (the first three fields little-endian)
_MSI_CLSIDS = frozenset(bytes.fromhex(f"{first}100c0000000000c000000000000046")
                        for first in ("84", "86", "82"))
_DIR_ENTRY = 128
_END = 0xFFFFFFFE  # ENDOFCHAIN
# Storages and streams of a VBA project: Word ("Macros/VBA"), Excel ("_VBA_PROJECT_CUR/VBA"),
# PowerPoint and others ("VBA", "_VBA_PROJECT")
_VBA_ENTRIES = frozenset({"vba", "_vba_project_cur", "_vba_project", "macros"})
# the shell link header: HeaderSize 0x4C and LinkCLSID {00021401-0000-0000-C000-000000000046}
_LNK_HEADER = (b"\x4c\x00\x00\x00\x01\x14\x02\x00\x00\x00\x00\x00"
               b"\xc0\x00\x00\x00\x00\x00\x00\x46")
# OneNote revision store file: {7B5C52E4-D88C-4DA7-AEB1-5378D02996D3} (section .one)
_ONENOTE_GUID = b"\xe4\x52\x5c\x7b\x8c\xd8\xa7\x4d\xae\xb1\x53\x78\xd0\x29\x96\xd3"
_MACHO_MAGICS = (b"\xfe\xed\xfa\xce", b"\xfe\xed\xfa\xcf", b"\xce\xfa\xed\xfe",
                 b"\xcf\xfa\xed\xfe")
_FAT_MAGIC = b"\xca\xfe\xba\xbe"  # also a Java class file: told apart by the next field
_MAX_FAT_ARCHS = 20  # file(1)'s bound: a Java class has its major version (>= 45) there
_ZIP_MAGIC = b"PK\x03\x04"
_PE_OFFSET = struct.Struct("<I")
_MAX_E_LFANEW = 1 << 20  # far past any real DOS stub; beyond it, no PE header is looked for
# Volume descriptors of ISO 9660 ("CD001") and UDF ("BEA01", "NSR02/03") from sector 16 on;
# 2048-byte sectors, the identifier after a one-byte type
_ISO_OFFSETS = (0x8001, 0x8801, 0x9001)
_ISO_IDS = (b"CD001", b"BEA01", b"NSR02", b"NSR03")
# Boot sectors (OEM name at 3, FAT type at 54 / 82) ending in 55 AA
_BOOT_IDS = ((3, b"NTFS    "), (3, b"EXFAT   "), (54, b"FAT12   "), (54, b"FAT16   "),
             (54, b"FAT     "), (82, b"FAT32   "))

_SCRIPT_ENCODED = re.compile(rb"#@~\^[A-Za-z0-9+/]{6}==")  # screnc: JScript/VBScript.Encode
_HTA = re.compile(rb"(?i)<hta:application\b")
# first element of a WSF: <job> or <package>, after an optional XML declaration/comments
_WSF_START = re.compile(rb"(?is)\A(?:\xef\xbb\xbf)?\s*(?:<\?xml[^>]{0,200}\?>\s*)?"
                        rb"(?:<!--.{0,2000}?-->\s*)*<(?:job|package)\b")
_WSF_SCRIPT = re.compile(rb"(?i)<script\b[^>]{0,200}\blanguage\s*=")
# JScript under WSH: the object model, with JavaScript syntax around it
_JS_OBJECTS = re.compile(rb"(?i)\bnew\s+ActiveXObject\s*\(|\bWScript\s*\.\s*(?:CreateObject"
                         rb"|Shell|Run|Sleep|ScriptFullName|Arguments)\b")
_JS_SYNTAX = re.compile(rb"\b(?:var|let|const|function)\s+[A-Za-z_$][\w$]*|\)\s*;\s*$",
                        re.MULTILINE)
# VBScript under WSH
_VBS_OBJECTS = re.compile(rb"(?i)\b(?:Wscript\.)?CreateObject\s*\(\s*\"|\bGetObject\s*\(\s*\"")
_VBS_SYNTAX = re.compile(rb"(?im)^\s*(?:Dim\s+\w|Set\s+\w+\s*=|(?:Private\s+|Public\s+)?Sub\s+\w"
                         rb"|Function\s+\w|On\s+Error\s+Resume\s+Next|End\s+Sub\b)")
_MARKUP = re.compile(rb"(?i)<(?:html|body|script)\b")


def identify(data: bytes, *, scripts: bool = True) -> frozenset[str]:
    """Every type of :data:`TYPES` that ``data`` is (see the module docstring)."""
    found: set[str] = set()
    head = data[:64]
    if head.startswith(b"MZ") and _is_pe(data):
        found.add("pe")
    elif head.startswith(b"\x7fELF") and len(head) >= 6 and head[4] in (1, 2) \
            and head[5] in (1, 2):
        found.add("elf")
    elif head.startswith(_MACHO_MAGICS) or (
            head.startswith(_FAT_MAGIC) and len(head) >= 8
            and 0 < struct.unpack_from(">I", head, 4)[0] < _MAX_FAT_ARCHS):
        found.add("macho")
    elif head.startswith(_OLE2_MAGIC):
        found.add("ole2")
        found.update(_ole2_types(data))
    elif head.startswith(_ZIP_MAGIC):
        found.update(_zip_types(data))
    elif head.startswith(_LNK_HEADER):
        found.add("lnk")
    elif head.startswith(_ONENOTE_GUID):
        found.add("onenote")
    elif _is_disk_image(data):
        found.add("img")
    if any(data[o:o + 5] in _ISO_IDS for o in _ISO_OFFSETS):
        found.add("iso")  # hybrid ISOs start with an MBR or anything else
    if scripts and not found:
        found.update(_script_types(data[:SCRIPT_PROBE]))
    return frozenset(found)


def _is_pe(data: bytes) -> bool:
    if len(data) < 0x40:
        return False
    (offset,) = _PE_OFFSET.unpack_from(data, 0x3C)
    return 0x40 <= offset <= _MAX_E_LFANEW and data[offset:offset + 4] == b"PE\0\0"


def _ole2_types(data: bytes) -> set[str]:
    """``msi`` and ``office-macro`` from the compound file's directory (empty if unreadable).

    The directory is read here rather than with olefile: olefile follows a sector chain for
    as many sectors as the FAT has, so a chain that loops makes a small file read as
    gigabytes. Here every chain is walked once per sector at most (a visited set), so the
    cost is bounded by the file's size.
    """
    if len(data) < 512:
        return set()
    shift = struct.unpack_from("<H", data, 0x1E)[0]
    if shift not in (9, 12):  # 512- or 4096-byte sectors: nothing else exists
        return set()
    size = 1 << shift
    sectors = (len(data) - size) // size  # sector n lies at (n + 1) * size
    per_fat = size // 4

    def sector(n: int) -> bytes | None:
        if not 0 <= n < sectors:
            return None
        offset = (n + 1) * size
        return data[offset:offset + size]

    fat_sectors = _fat_sectors(data, sector, per_fat, sectors)

    def next_sector(n: int) -> int:
        index, slot = divmod(n, per_fat)
        if index >= len(fat_sectors):
            return _END
        fat = sector(fat_sectors[index])
        return _END if fat is None else struct.unpack_from("<I", fat, slot * 4)[0]

    found: set[str] = set()
    visited: set[int] = set()
    current = struct.unpack_from("<I", data, 0x30)[0]  # the directory's first sector
    first = True
    while current not in visited and (block := sector(current)) is not None:
        visited.add(current)
        for pos in range(0, size, _DIR_ENTRY):
            entry = block[pos:pos + _DIR_ENTRY]
            if first and pos == 0 and entry[0x50:0x60] in _MSI_CLSIDS:
                found.add("msi")  # the root entry's class id
            name_len = min(struct.unpack_from("<H", entry, 0x40)[0], 64)
            name = entry[:max(name_len - 2, 0)].decode("utf-16-le", "replace").lower()
            if entry[0x42] in (1, 2) and name in _VBA_ENTRIES:  # a storage or a stream
                found.add("office-macro")
        first = False
        current = next_sector(current)
    return found


def _fat_sectors(data: bytes, sector: Callable[[int], bytes | None], per_fat: int,
                 sectors: int) -> list[int]:
    """The FAT's sector numbers: 109 in the header, the rest along the DIFAT chain."""
    header = struct.unpack_from("<109I", data, 0x4C)
    found = [n for n in header if n < sectors]
    current, visited = struct.unpack_from("<I", data, 0x44)[0], set()
    while current not in visited and (block := sector(current)) is not None:
        visited.add(current)
        entries = struct.unpack_from(f"<{per_fat}I", block)
        found.extend(n for n in entries[:-1] if n < sectors)
        current = entries[-1]
    return found


def _zip_types(data: bytes) -> set[str]:
    """``ooxml`` / ``office-macro`` for a zip: names are stored as written, so a find suffices
    (``vbaProject.bin`` in the local headers and the central directory alike)."""
    found: set[str] = set()
    if data.find(b"[Content_Types].xml") >= 0:
        found.add("ooxml")
        if data.find(b"vbaProject.bin") >= 0:
            found.add("office-macro")
    return found


def _is_disk_image(data: bytes) -> bool:
    if data.startswith((b"conectix", b"vhdxfile")):  # VHD (copy of the footer), VHDX
        return True
    if len(data) < 512:
        return False
    tail = data[-512:]
    if tail.startswith((b"koly", b"conectix")):  # DMG's UDIF trailer, a VHD's footer
        return True
    return data[510:512] == b"\x55\xaa" and any(
        data[o:o + len(tag)] == tag for o, tag in _BOOT_IDS)


def _script_types(text: bytes) -> set[str]:
    if b"\0" in text[:4096]:
        return set()  # binary (or UTF-16, which WSH runs only with a BOM: not looked at)
    found: set[str] = set()
    if _SCRIPT_ENCODED.search(text):
        found.update(("js", "vbs"))
    if _HTA.search(text):
        found.add("hta")
    if _WSF_START.match(text) and _WSF_SCRIPT.search(text):
        found.add("wsf")
    if found or _MARKUP.search(text):
        return found  # a web page's script runs in a browser, not in WSH
    if _JS_OBJECTS.search(text) and _JS_SYNTAX.search(text):
        found.add("js")
    if _VBS_OBJECTS.search(text) and _VBS_SYNTAX.search(text):
        found.add("vbs")
    return found

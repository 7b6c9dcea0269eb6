"""Banned file types (avgate.banned): settings, the matcher over decomposed content, the
context rules, the check beside the engines in ScanService (real scan workers), and the
policy's banned action.
"""

from __future__ import annotations

import base64
import os
import struct
from email.message import EmailMessage
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import settings as fuzz_settings
from hypothesis import strategies as st

from avgate import config
from avgate.banned import (
    DEFAULT_RULES,
    BannedCheck,
    BannedSettings,
    Inspection,
    inspect_bytes,
    part_name,
)
from avgate.context import Context
from avgate.decision import Disposition
from avgate.errors import ConfigError
from avgate.limits import Limits
from avgate.policy import Policy, PolicySettings
from avgate.result import BANNED_ENGINE, Finding, ScanResult, ScanStatus
from avgate.scan import ScanService
from avgate.spool import Spool
from tests.unit.content.test_typeid import (
    JSCRIPT,
    MSI_CLSID,
    docm_bytes,
    elf_bytes,
    lnk_bytes,
    ole2_bytes,
    onenote_bytes,
    pe_bytes,
    zip_bytes,
)
from tests.unit.test_scan_service import CountingEngine

LIMITS = Limits()
SMTP = Context("smtp", sender="someone@example.org", recipients=["user@example.com"])
EXAMPLES = int(os.environ.get("AVGATE_FUZZ_EXAMPLES", "200"))
EICAR = rb"X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"


def mail(*attachments: tuple[str, bytes, str], body: str = "Hello,\nsee attached.\n") -> bytes:
    m = EmailMessage()
    m["From"], m["To"], m["Subject"] = "a@example.org", "b@example.com", "files"
    m.set_content(body)
    for name, data, ctype in attachments:
        main, sub = ctype.split("/")
        m.add_attachment(data, maintype=main, subtype=sub, filename=name)
    return m.as_bytes()


def raw_mail(disposition: str, data: bytes, ctype: str = "application/octet-stream") -> bytes:
    """A message whose one attachment has the Content-Disposition line as given (encoded
    names written by hand, as other mailers write them)."""
    return (b"From: a@example.org\r\nTo: b@example.com\r\nSubject: x\r\nMIME-Version: 1.0\r\n"
            b"Content-Type: multipart/mixed; boundary=\"b\"\r\n\r\n--b\r\n"
            b"Content-Type: text/plain\r\n\r\nhi\r\n--b\r\n"
            + f"Content-Type: {ctype}\r\nContent-Disposition: {disposition}\r\n".encode()
            + b"Content-Transfer-Encoding: base64\r\n\r\n" + base64.encodebytes(data)
            + b"--b--\r\n")


def check(settings: BannedSettings | None = None) -> BannedCheck:
    return BannedCheck(settings or BannedSettings(), LIMITS)


def banned(data: bytes, ctx: Context = SMTP, settings: BannedSettings | None = None
           ) -> list[tuple[str, str]]:
    """(finding name, part path) of every banned part of ``data`` in ``ctx``."""
    c = check(settings)
    found = c.findings(inspect_bytes(data, c.matchers, LIMITS), ctx)
    assert all(f.engine == BANNED_ENGINE for f in found)
    return [(f.name, f.part) for f in found]


def settings_of(toml: str) -> BannedSettings:
    return config.loads(toml).banned


# -- settings -----------------------------------------------------------------------------------
def test_defaults_and_config_section() -> None:
    s = config.loads("").banned
    assert s.enabled and s.defaults and not s.rules
    assert "clamd" not in s.frontends and "cli" not in s.frontends
    assert {"smtp", "milter", "qmail", "icap", "http"} <= set(s.frontends)
    shown = config.loads('[[banned.rules]]\nname = "x"\nfilename = "*.exe"\n').to_dict()
    assert shown["banned"]["rules"][0]["filename"] == ["*.exe"]
    assert "[[banned.rules]]" in config.render_toml(shown)
    # every built-in rule is for the mail front-ends only
    for rule in DEFAULT_RULES:
        assert rule.frontend is not None and {"smtp", "milter", "qmail"} <= set(rule.frontend)
        assert not {"icap", "http", "clamd", "cli"} & set(rule.frontend)


@pytest.mark.parametrize(("toml", "message"), [
    ('name = "has space"\nfilename = "*.exe"', "banned.rules[0].name (line 2): expected 1-64"),
    ('name = "x"', "needs at least one of filename, filename_regex"),
    ('name = "x"\ndetected_type = "exe"', "unknown detected_type 'exe' (known: pe, elf"),
    ('name = "x"\nfilename_regex = "(unclosed"', "not a regular expression"),
    ('name = "x"\nfilename = []', "expected at least one item"),
    ('name = "x"\nfilename = "*.exe"\ndirection = "sideways"', "banned.rules[0].direction"),
    ('name = "x"\nfilename = "*.exe"\nblocked = true', "unknown key"),
    ('filename = "*.exe"', "banned.rules[0].name (line 1): missing"),
])
def test_bad_rules_are_refused_with_key_and_line(toml: str, message: str) -> None:
    with pytest.raises(ConfigError) as exc:
        config.loads("[[banned.rules]]\n" + toml + "\n")
    assert message in str(exc.value)


def test_unknown_frontend_refused() -> None:
    with pytest.raises(ConfigError, match=r"banned\.frontends .*unknown frontend 'web'"):
        config.loads('[banned]\nfrontends = ["web"]\n')


def test_disabled_or_empty_means_no_check() -> None:
    assert BannedCheck.from_config(config.loads("[banned]\nenabled = false\n")) is None
    assert BannedCheck.from_config(config.loads("[banned]\ndefaults = false\n")) is None
    only = BannedCheck.from_config(config.loads(
        '[banned]\ndefaults = false\n[[banned.rules]]\nname = "x"\nfilename = "*.x"\n'))
    assert only is not None and [m.name for m in only.matchers] == ["x"]


# -- names ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(("path", "name"), [
    ("", ""),
    ("1", ""),
    ("2/1", ""),
    ("preamble", ""),
    ("2/Invoice.PDF.exe", "invoice.pdf.exe"),
    ("2/invoice.exe. . ", "invoice.exe"),  # Windows drops trailing dots and blanks
    ("2/invoice\u202egpj.exe", "invoicegpj.exe"),  # right-to-left override: shows as ...exe.jpg
    ("2/inv\u200boice.exe", "invoice.exe"),  # zero-width space
    ("2/\uff45\uff56\uff49\uff4c.\uff45\uff58\uff45", "evil.exe"),  # fullwidth, NFKC
    ("2/a.zip/dir/sub/run.js", "run.js"),
    ("2/run.js~b64", "run.js"),  # a second decoding of the same part
    ("2/run.js~cte2", "run.js"),
])
def test_part_name(path: str, name: str) -> None:
    assert part_name(path) == name


@fuzz_settings(max_examples=EXAMPLES, deadline=None)
@given(segments=st.lists(st.text(max_size=40), min_size=1, max_size=4))
def test_any_name_is_matched_without_error(segments: list[str]) -> None:
    path = "/".join(segments)
    name = part_name(path)
    assert "/" not in name and name == name.lower()
    c = check()
    for m in c.matchers:
        m.matches(name, "application/octet-stream", frozenset)


# -- the matcher --------------------------------------------------------------------------------
def test_clean_corpus_is_not_banned() -> None:
    png = b"\x89PNG\r\n\x1a\n" + bytes(64)
    pdf = b"%PDF-1.7\n1 0 obj\n<<>>\nendobj\n%%EOF\n"
    assert banned(b"Subject: hi\r\n\r\njust text\r\n") == []
    assert banned(mail(("notes.txt", b"plain text", "text/plain"),
                       ("report.pdf", pdf, "application/pdf"),
                       ("photo.png", png, "image/png"),
                       ("setup-1.2.zip", zip_bytes({"readme.txt": b"hi"}), "application/zip"),
                       ("budget.xlsx", zip_bytes({"[Content_Types].xml": b"<T/>"}),
                        "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet"),
                       ("old.doc", ole2_bytes(storages=("WordDocument",)),
                        "application/msword"))) == []
    # version numbers are no double extension; a macro document is not banned by default
    assert banned(mail(("putty-0.81.exe.txt", b"notes", "text/plain"),
                       ("report.docm", docm_bytes(), "application/octet-stream"))) == []
    assert banned(EICAR) == []  # a virus is the engines' business, not a banned type


@pytest.mark.parametrize(("data", "rule"), [
    (pe_bytes(), "executable"),
    (elf_bytes(), "executable"),
    (b"\xcf\xfa\xed\xfe" + bytes(60), "executable"),
    (ole2_bytes(MSI_CLSID), "executable"),
    (lnk_bytes(), "shortcut"),
    (onenote_bytes(), "onenote"),
    (JSCRIPT, "script"),
])
def test_default_set_by_detected_type(data: bytes, rule: str) -> None:
    # a harmless-looking name: the bytes decide
    assert banned(mail(("document.dat", data, "application/octet-stream"))) == [
        (f"Banned.{rule}", "2/document.dat")]


@pytest.mark.parametrize(("name", "rule"), [
    ("invoice.pdf.exe", "double-extension"),
    ("Invoice.PDF .EXE", "double-extension"),
    ("scan.jpg.scr", "windows-script"),  # *.scr comes first
    ("order.js", "windows-script"),
    ("Order.VBS", "windows-script"),
    ("run.cmd", "windows-script"),
    ("shortcut.lnk", "windows-script"),
    ("photo.jpeg.com", "double-extension"),
])
def test_default_set_by_name(name: str, rule: str) -> None:
    # text content: the name alone bans it
    assert banned(mail((name, b"just some bytes", "application/octet-stream"))) == [
        (f"Banned.{rule}", f"2/{name}")]


def test_declared_mime_type() -> None:
    got = banned(mail(("data.bin", b"not really", "application/x-msdownload")))
    assert got == [("Banned.executable-mime", "2/data.bin")]
    # the declared type of a MIME part is matched, not guessed for archive members
    settings = settings_of('[banned]\ndefaults = false\n[[banned.rules]]\nname = "pdf"\n'
                           'mime_type = "application/PDF"\n')
    assert banned(mail(("a.pdf", b"%PDF-1.4", "application/pdf")), settings=settings) == [
        ("Banned.pdf", "2/a.pdf")]
    assert banned(mail(("a.zip", zip_bytes({"a.pdf": b"%PDF-1.4"}), "application/zip")),
                  settings=settings) == []


def test_encoded_names_rfc2231_and_rfc2047() -> None:
    exe = pe_bytes()
    rfc2231 = raw_mail("attachment; filename*=utf-8''Rechnung%2Epdf%2Eexe", b"text only")
    assert banned(rfc2231) == [("Banned.double-extension", "2/Rechnung.pdf.exe")]
    continued = raw_mail("attachment; filename*0*=utf-8''order; filename*1=\".js\"", b"x")
    assert banned(continued) == [("Banned.windows-script", "2/order.js")]
    word = base64.b64encode("Überweisung.pdf.exe".encode()).decode()
    rfc2047 = raw_mail(f'attachment; filename="=?UTF-8?B?{word}?="', b"text only")
    assert banned(rfc2047) == [("Banned.double-extension", "2/Überweisung.pdf.exe")]
    rlo = raw_mail("attachment; filename*=utf-8''invoice%E2%80%AEfdp.exe", exe)
    assert banned(rlo) == [("Banned.executable", "2/invoice\u202efdp.exe")]


def test_names_and_types_inside_archives() -> None:
    inner = zip_bytes({"docs/readme.txt": b"hello", "docs/invoice.pdf.js": b"x",
                       "bin/tool": pe_bytes()})
    outer = zip_bytes({"nested.zip": inner})
    assert banned(mail(("files.zip", outer, "application/zip"))) == [
        ("Banned.windows-script", "2/files.zip/nested.zip/docs/invoice.pdf.js"),
        ("Banned.executable", "2/files.zip/nested.zip/bin/tool"),
    ]


def _encrypted(zip_data: bytes) -> bytes:
    """Set the "encrypted" flag on every member (local and central headers): the contents
    cannot be read, the names still can."""
    out = bytearray(zip_data)
    for sig, flag_at in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        pos = out.find(sig)
        while pos >= 0:
            struct.pack_into("<H", out, pos + flag_at, 1)
            pos = out.find(sig, pos + 4)
    return bytes(out)


def test_names_of_encrypted_members_count() -> None:
    data = mail(("secret.zip", _encrypted(zip_bytes({"invoice.pdf.exe": pe_bytes(),
                                                     "notes.txt": b"hi"})),
                 "application/zip"))
    c = check()
    inspection = inspect_bytes(data, c.matchers, LIMITS)
    assert [(f.name, f.part) for f in c.findings(inspection, SMTP)] == [
        ("Banned.double-extension", "2/secret.zip/invoice.pdf.exe")]
    # what could not be opened is said, as the embedded engine says it
    assert inspection.problem is not None
    assert inspection.problem.status is ScanStatus.UNKNOWN
    assert "2/secret.zip/notes.txt: encrypted" in inspection.problem.reason


def test_filename_glob_regex_and_last_segment_only() -> None:
    settings = settings_of(
        '[banned]\ndefaults = false\n'
        '[[banned.rules]]\nname = "exe"\nfilename = ["*.EXE", "*.com"]\n'
        '[[banned.rules]]\nname = "year"\nfilename_regex = "^report-20[0-9]{2}\\\\.txt$"\n')
    data = mail(("TOOL.exe", b"a", "application/octet-stream"),
                ("dir.exe.zip", zip_bytes({"dir.exe/readme.txt": b"b"}), "application/zip"),
                ("Report-2024.TXT", b"c", "text/plain"),
                ("report-24.txt", b"d", "text/plain"))
    assert banned(data, settings=settings) == [
        ("Banned.exe", "2/TOOL.exe"), ("Banned.year", "4/Report-2024.TXT")]


def test_all_keys_of_a_rule_must_match() -> None:
    settings = settings_of('[banned]\ndefaults = false\n[[banned.rules]]\nname = "exe"\n'
                           'filename = "*.exe"\ndetected_type = "pe"\n')
    data = mail(("real.exe", pe_bytes(), "application/octet-stream"),
                ("fake.exe", b"text", "application/octet-stream"),
                ("hidden.dat", pe_bytes(), "application/octet-stream"))
    assert banned(data, settings=settings) == [("Banned.exe", "2/real.exe")]


def test_script_heuristics_only_for_named_parts() -> None:
    # a mail body quoting a script runs nowhere; an attachment with no telling name does
    assert banned(mail(body=JSCRIPT.decode())) == []
    assert banned(mail(("snippet", JSCRIPT, "application/octet-stream"))) == [
        ("Banned.script", "2/snippet")]
    # macro source the Office decomposer extracts is no WSH script (macros: office-macro)
    vba = b'Sub AutoOpen()\nDim s\nSet s = CreateObject("WScript.Shell")\nEnd Sub\n'
    assert banned(zip_bytes({"doc/Macros/VBA/ThisDocument/source.vba": vba})) == []
    assert banned(zip_bytes({"doc/Macros/VBA/ThisDocument/module": vba})) == [
        ("Banned.script", "doc/Macros/VBA/ThisDocument/module")]


def test_allow_rules_first_match_wins() -> None:
    settings = settings_of(
        '[[banned.rules]]\nname = "vendor"\nallow = true\nfilename = "*.exe"\n'
        'sender = "*@Vendor.Example"\n'
        '[[banned.rules]]\nname = "installers"\nallow = true\nfilename = "setup.exe"\n')
    data = mail(("tool.exe", pe_bytes(), "application/octet-stream"),
                ("setup.exe", pe_bytes(), "application/octet-stream"))
    vendor = Context("smtp", sender="Build@vendor.example", recipients=["u@example.com"])
    assert banned(data, vendor, settings) == []  # both exempt for the vendor
    # anyone else: the conditional allow does not hold, the defaults ban tool.exe;
    # setup.exe is exempt for everyone
    assert banned(data, SMTP, settings) == [("Banned.executable", "2/tool.exe")]


def test_allow_inside_archives_by_direction() -> None:
    settings = settings_of(
        '[[banned.rules]]\nname = "outbound-zips"\nallow = true\ndetected_type = "pe"\n'
        'direction = "outbound"\n')
    data = mail(("build.zip", zip_bytes({"app.exe": pe_bytes()}), "application/zip"))
    outbound = Context("smtp", direction="outbound", sender="dev@example.com")
    assert banned(data, outbound, settings) == []
    assert banned(data, SMTP, settings) == [("Banned.executable", "2/build.zip/app.exe")]


def test_conditional_deny_rule() -> None:
    settings = settings_of('[banned]\ndefaults = false\n[[banned.rules]]\nname = "iso-in"\n'
                           'detected_type = ["iso", "img"]\nrecipient = "*@example.com"\n')
    from tests.unit.content.test_typeid import iso_bytes

    data = mail(("disk.iso", iso_bytes(), "application/octet-stream"))
    assert banned(data, SMTP, settings) == [("Banned.iso-in", "2/disk.iso")]
    other = Context("smtp", sender="a@b.example", recipients=["x@elsewhere.example"])
    assert banned(data, other, settings) == []


def test_default_set_is_for_mail_your_rules_for_every_frontend() -> None:
    exe = pe_bytes()
    icap = Context("icap")
    assert banned(exe, icap) == []  # an executable download is no banned type by default
    assert banned(exe, Context("milter")) == [("Banned.executable", "")]
    settings = settings_of('[[banned.rules]]\nname = "exe-download"\ndetected_type = "pe"\n')
    assert banned(exe, icap, settings) == [("Banned.exe-download", "")]


def test_defaults_off() -> None:
    settings = settings_of('[banned]\ndefaults = false\n[[banned.rules]]\nname = "x"\n'
                           'filename = "*.xyz"\n')
    assert banned(mail(("a.exe", pe_bytes(), "application/octet-stream")),
                  settings=settings) == []


def test_limits_make_the_result_undecidable() -> None:
    data = mail(*[(f"f{i}.txt", b"x", "text/plain") for i in range(5)])
    c = check()
    inspection = inspect_bytes(data, c.matchers, Limits(max_files=3))
    assert inspection.problem is not None
    assert inspection.problem.status is ScanStatus.SKIPPED
    assert inspection.problem.limit is not None and inspection.problem.limit.value == "structural"


# -- beside the engines: ScanService with real scan workers ------------------------------------
def _service(engine_status: ScanStatus = ScanStatus.CLEAN, toml: str = "",
             cache: bool = True) -> tuple[ScanService, CountingEngine]:
    cfg = config.loads("[scan]\nworkers = 1\n" + toml)
    engine = CountingEngine("clamd", engine_status)
    from avgate.scan import VerdictCache

    return ScanService([engine], cache=VerdictCache() if cache else None,
                       banned=BannedCheck.from_config(cfg, workers=1)), engine


async def test_scan_service_merges_banned_findings_with_any_engine() -> None:
    service, engine = _service()
    data = mail(("invoice.pdf.exe", pe_bytes(), "application/octet-stream"))
    async with service:
        with Spool.from_bytes(data) as spool:
            result = await service.scan(spool, SMTP)
        assert result.status is ScanStatus.INFECTED and result.banned_only
        assert result.findings == (Finding("Banned.executable", BANNED_ENGINE,
                                           "2/invoice.pdf.exe"),)
        assert engine.calls == 1  # the engines still ran
        # without a context (avgate scan) or for clamd clients: no banned types
        with Spool.from_bytes(data) as spool:
            assert (await service.scan(spool)).status is ScanStatus.CLEAN
        with Spool.from_bytes(data) as spool:
            assert (await service.scan(spool, Context("clamd"))).status is ScanStatus.CLEAN
        # the engines' verdict came from their cache; the context still decides
        with Spool.from_bytes(data) as spool:
            again = await service.scan(spool, SMTP)
        assert again.cached and again.banned_only and engine.calls == 1


async def test_virus_and_banned_type_together() -> None:
    service, _ = _service(ScanStatus.INFECTED)
    async with service:
        with Spool.from_bytes(mail(("a.exe", pe_bytes(), "application/octet-stream"))) as s:
            result = await service.scan(s, SMTP)
    assert result.virus_names == ("V.clamd", "Banned.executable")  # the virus comes first
    assert not result.banned_only


async def test_clean_mail_stays_exactly_the_engines_result() -> None:
    service, _ = _service()
    async with service:
        with Spool.from_bytes(mail(("notes.txt", b"hi", "text/plain"))) as spool:
            result = await service.scan(spool, SMTP)
    assert result.status is ScanStatus.CLEAN and result.findings == ()


async def test_undecidable_check_is_never_clean() -> None:
    service, _ = _service(toml="[limits]\nmax_files = 2\n")
    data = mail(*[(f"f{i}.txt", b"x", "text/plain") for i in range(4)])
    async with service:
        with Spool.from_bytes(data) as spool:
            result = await service.scan(spool, SMTP)
    assert result.status is ScanStatus.SKIPPED
    assert result.limit is not None and result.limit.value == "structural"


async def test_worker_failure_is_an_error_not_clean(monkeypatch: pytest.MonkeyPatch) -> None:
    service, _ = _service(cache=False)
    assert service.banned is not None
    # a worker whose task raises (a bug) must not pass the object
    monkeypatch.setattr("avgate.banned._inspect_task", _raising_task)
    async with service:
        with Spool.from_bytes(b"anything") as spool:
            result = await service.scan(spool, SMTP)
    assert result.status is ScanStatus.ERROR
    assert "banned-type check failed" in result.reason


def _raising_task(source: bytes | str, budget: float) -> Inspection:
    raise RuntimeError("boom")


async def test_large_spool_is_read_by_path(tmp_path: Path) -> None:
    service, _ = _service()
    data = mail(("a.js", b"x" * 4096, "application/octet-stream"))
    async with service:
        spool = Spool(memory_limit=1024, directory=str(tmp_path))
        spool.write(data)
        with spool:
            assert not spool.in_memory
            result = await service.scan(spool, SMTP)
    assert result.virus_names == ("Banned.windows-script",)


# -- policy ---------------------------------------------------------------------------------------
BANNED = ScanResult(ScanStatus.INFECTED, (Finding("Banned.executable", BANNED_ENGINE, "2/a"),))
VIRUS_AND_BANNED = ScanResult(ScanStatus.INFECTED, (
    Finding("Eicar-Test-Signature", "embedded", "3"), *BANNED.findings))


def _policy(toml: str = "") -> Policy:
    return Policy(config.loads(toml).policy)


def test_policy_banned_action_default_reject() -> None:
    d = _policy().decide(BANNED, SMTP, refid="R1")
    assert d.disposition is Disposition.REJECT and d.rule == "default:banned"
    assert d.reply == "554 5.7.1 Banned content: Banned.executable (RefID R1)"
    virus = _policy().decide(VIRUS_AND_BANNED, SMTP, refid="R2")
    assert virus.rule == "default:infected"
    assert virus.reply == "550 5.7.1 Virus found: Eicar-Test-Signature (RefID R2)"


def test_policy_banned_action_and_reply_configurable() -> None:
    p = _policy('[policy]\nbanned_action = "quarantine"\n')
    d = p.decide(BANNED, SMTP)
    assert d.disposition is Disposition.DISCARD and d.quarantine
    p = _policy('[policy]\nbanned_reply = "550 5.7.1 {virus} not allowed here"\n')
    assert p.decide(BANNED, SMTP).reply == "550 5.7.1 Banned.executable not allowed here"
    t = _policy('[policy]\nbanned_action = "tempfail"\n').decide(BANNED, SMTP, refid="R")
    assert t.reply == "451 4.7.1 Message held: banned content (Banned.executable) (RefID R)"
    with pytest.raises(ConfigError, match="banned_action"):
        config.loads('[policy]\nbanned_action = "keep"\n')
    with pytest.raises(ConfigError, match=r"banned_reply.*5xx"):
        config.loads('[policy]\nbanned_reply = "250 ok"\n')


def test_policy_rule_banned_condition() -> None:
    p = _policy('[[policy.rules]]\nname = "hold-banned"\nbanned = true\n'
                'action = "quarantine"\n'
                '[[policy.rules]]\nname = "reject-rest"\nstatus = "infected"\nbanned = false\n'
                'action = "reject"\n')
    assert p.decide(BANNED, SMTP).rule == "hold-banned"
    assert p.decide(VIRUS_AND_BANNED, SMTP).rule == "reject-rest"
    assert p.decide(ScanResult(ScanStatus.CLEAN), SMTP).rule == "default:clean"
    # a rule's reject without a reply of its own uses banned_reply for banned results
    r = _policy('[[policy.rules]]\nbanned = true\naction = "reject"\n').decide(
        BANNED, SMTP, refid="X")
    assert r.reply == "554 5.7.1 Banned content: Banned.executable (RefID X)"


def test_banned_name_in_headers() -> None:
    p = Policy(PolicySettings())
    assert ("X-Virus-Status", "Infected (Banned.executable)") in p.headers_for(BANNED)


async def test_embedded_engine_inspects_in_its_own_pass() -> None:
    """With the embedded engine configured, an object is decomposed once: the engine's scan
    workers match the banned-type rules in the same pass, and the check's own workers never
    start (also not for a verdict from the cache: the inspection is remembered)."""
    cfg = config.loads("[scan]\nworkers = 1\n")
    service = ScanService.from_config(cfg)
    assert service.banned is not None and service.banned.partner is not None
    async with service:
        for _ in range(2):  # the second time from the verdict cache
            spool = Spool()
            spool.write(mail(("invoice.pdf.exe", pe_bytes(), "application/octet-stream"),
                             ("readme.txt", b"hello", "text/plain")))
            result = await service.scan(spool.finish(), SMTP)
            assert result.infected and result.virus_names == ("Banned.executable",)
            assert service.banned._pool is None  # never decomposed a second time
        clean = Spool()
        clean.write(mail(("notes.txt", b"just text", "text/plain")))
        assert (await service.scan(clean.finish(), SMTP)).status is ScanStatus.CLEAN
        assert service.banned._pool is None


def test_check_runs_only_where_some_rule_can_ban() -> None:
    """The built-in set bans in mail only, so ICAP and HTTP objects are not decomposed for
    it (that cost 2.4 ms CPU per ICAP object in the bench); a rule of one's own for the web
    brings the check there."""
    defaults = check()
    assert defaults.applies(SMTP) and defaults.applies(Context("milter"))
    assert not defaults.applies(Context("icap")) and not defaults.applies(Context("http"))
    web = check(settings_of('[[banned.rules]]\nname = "exe-download"\n'
                            'detected_type = "pe"\nfrontend = "icap"\n'))
    assert web.applies(Context("icap")) and not web.applies(Context("http"))
    allow_only = check(settings_of('[banned]\ndefaults = false\n[[banned.rules]]\n'
                                   'name = "ok"\nallow = true\nfilename = "*.exe"\n'))
    assert not allow_only.applies(SMTP)

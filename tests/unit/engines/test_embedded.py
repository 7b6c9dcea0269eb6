"""The embedded engine: config, loading, built-in EICAR, hash/body/YARA signatures, scanning."""

from __future__ import annotations

import base64
import hashlib
import io
import zipfile
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path

import pytest

import avgate.content as content
from avgate import config
from avgate.engines.base import EngineContext, build_engine
from avgate.engines.embedded import (
    EICAR,
    EICAR_NAME,
    EmbeddedEngine,
    EmbeddedEngineSettings,
    is_eicar,
)
from avgate.errors import ConfigError, EngineError, SignatureError
from avgate.limits import Limits
from avgate.result import ScanStatus
from avgate.spool import Spool
from tests import corpus
from tests.corpus import MARKER

EICAR_MD5 = hashlib.md5(EICAR, usedforsecurity=False).hexdigest()


def engine(tmp_path: Path, limits: Limits | None = None, **table: object) -> EmbeddedEngine:
    ctx = EngineContext(limits=limits or Limits(), base_dir=str(tmp_path))
    eng = build_engine(EmbeddedEngineSettings(**table), ctx)  # type: ignore[arg-type]
    assert isinstance(eng, EmbeddedEngine)
    eng.load()
    return eng


async def scan(eng: EmbeddedEngine, data: bytes) -> tuple[ScanStatus, list[str]]:
    result = await eng.scan(Spool.from_bytes(data))
    return result.status, [f.name for f in result.findings]


@pytest.fixture
def sigdir(tmp_path: Path) -> Path:
    d = tmp_path / "sigs"
    d.mkdir()
    (d / "test.hdb").write_text(f"{EICAR_MD5}:68:Eicar-Test-Signature-HDB\n")
    (d / "test.ndb").write_text(f"Test.Body.Pattern:0:*:{MARKER.hex()}\n")
    (d / "README.txt").write_text("not a signature file: ignored in a directory\n")
    return d


# -- config -------------------------------------------------------------------------------

def test_build_engine_defaults(tmp_path: Path) -> None:
    [settings] = config.from_dict({}).engines  # the default engine
    eng = build_engine(settings, EngineContext())
    assert isinstance(eng, EmbeddedEngine)
    assert (eng.name, eng.builtin, eng.rule_paths, eng.signature_paths) == (
        "embedded", True, [], [])


@pytest.mark.parametrize(("index", "table", "message"), [
    (2, {"signatures": 5}, "engines[2].signatures: expected a list of paths"),
    (0, {"rules": [1]}, "engines[0].rules: expected a list of paths"),
    (0, {"rules": [""]}, "engines[0].rules: expected a list of paths"),
    (0, {"builtin": "yes"}, "engines[0].builtin: Input should be a valid boolean"),
])
def test_config_rejects(index: int, table: dict[str, object], message: str) -> None:
    engines = [{"type": "embedded"} for _ in range(index)] + [{"type": "embedded", **table}]
    with pytest.raises(ConfigError) as exc:
        config.from_dict({"engines": engines})
    assert message in str(exc.value)


def test_unknown_key_rejected() -> None:
    with pytest.raises(ConfigError, match=r"engines\[0\]\.signature: unknown key"):
        config.from_dict({"engines": [{"type": "embedded", "signature": ["x"]}]})


def test_paths_relative_to_base_dir(tmp_path: Path, sigdir: Path) -> None:
    eng = engine(tmp_path, signatures="sigs")  # a single string is accepted too
    assert eng.signature_paths == [tmp_path / "sigs"]


# -- built-in EICAR -----------------------------------------------------------------------

@pytest.mark.parametrize(("data", "expected"), [
    (EICAR, True),
    (EICAR + b"\r\n", True),
    (EICAR + b" " * 60, True),  # 128 bytes in all
    (EICAR + b" " * 61, False),  # 129 bytes: no longer the EICAR file
    (EICAR + b"\n\x1a", True),
    (EICAR + b"x", False),
    (b" " + EICAR, False),  # a prefix: not the test file (as ClamAV)
    (EICAR[:-1], False),
])
def test_is_eicar(data: bytes, expected: bool) -> None:
    assert is_eicar(data) is expected


async def test_builtin_eicar_on_and_off(tmp_path: Path) -> None:
    assert await scan(engine(tmp_path), EICAR + b"\n") == (ScanStatus.INFECTED, [EICAR_NAME])
    assert await scan(engine(tmp_path), b"hello") == (ScanStatus.CLEAN, [])
    assert await scan(engine(tmp_path), b"prefix " + EICAR) == (ScanStatus.CLEAN, [])
    assert await scan(engine(tmp_path, builtin=False), EICAR) == (ScanStatus.CLEAN, [])


# -- signatures ---------------------------------------------------------------------------

async def test_hdb_and_ndb_from_directory(tmp_path: Path, sigdir: Path) -> None:
    eng = engine(tmp_path, signatures=["sigs"], builtin=False)
    assert await scan(eng, EICAR) == (ScanStatus.INFECTED, ["Eicar-Test-Signature-HDB"])
    assert await scan(eng, EICAR + b" ") == (ScanStatus.CLEAN, [])  # other size, other md5
    assert await scan(eng, b"abc " + MARKER + b" def") == (
        ScanStatus.INFECTED, ["Test.Body.Pattern"])
    health = await eng.health()
    assert (health["hash_signatures"], health["body_signatures"]) == (1, 1)


async def test_builtin_and_signatures_both_reported(tmp_path: Path, sigdir: Path) -> None:
    eng = engine(tmp_path, signatures=["sigs"])
    status, names = await scan(eng, EICAR)
    assert status is ScanStatus.INFECTED
    assert sorted(names) == [EICAR_NAME, "Eicar-Test-Signature-HDB"]


async def test_same_name_from_builtin_and_hdb_is_one_finding(tmp_path: Path) -> None:
    d = tmp_path / "sigs"
    d.mkdir()
    (d / "test.hdb").write_text(f"{EICAR_MD5}:68:{EICAR_NAME}\n")
    eng = engine(tmp_path, signatures=["sigs"])
    assert await scan(eng, EICAR) == (ScanStatus.INFECTED, [EICAR_NAME])


@pytest.mark.parametrize(("algo", "size"), [
    ("md5", "68"), ("sha1", "68"), ("sha256", "68"), ("sha1", "*"), ("sha256", "*"),
])
async def test_hsb_hashes(tmp_path: Path, algo: str, size: str) -> None:
    digest = hashlib.new(algo, EICAR).hexdigest()
    (tmp_path / "t.hsb").write_text(f"{digest}:{size}:Hash.{algo}\n")
    eng = engine(tmp_path, signatures=["t.hsb"], builtin=False)
    assert await scan(eng, EICAR) == (ScanStatus.INFECTED, [f"Hash.{algo}"])
    assert await scan(eng, EICAR.lower()) == (ScanStatus.CLEAN, [])


async def test_ndb_offsets_through_engine(tmp_path: Path) -> None:
    (tmp_path / "o.ndb").write_text(
        f"At.Zero:0:0:{MARKER.hex()}\nAt.End:0:EOF-{len(MARKER)}:{MARKER.hex()}\n")
    eng = engine(tmp_path, signatures=["o.ndb"])
    assert await scan(eng, MARKER + b"tail") == (ScanStatus.INFECTED, ["At.Zero"])
    assert await scan(eng, b"head" + MARKER) == (ScanStatus.INFECTED, ["At.End"])
    assert await scan(eng, b"head" + MARKER + b"tail") == (ScanStatus.CLEAN, [])


def test_bad_signature_names_file_line_and_name(tmp_path: Path) -> None:
    (tmp_path / "bad.ndb").write_text(
        f"Good.One:0:*:{MARKER.hex()}\n\nBad.Two:0:*:4142!(43|44)45\n")
    with pytest.raises(SignatureError) as exc:
        engine(tmp_path, signatures=["bad.ndb"])
    assert f"{tmp_path / 'bad.ndb'}:3: Bad.Two" in str(exc.value)


def test_missing_signature_path(tmp_path: Path) -> None:
    with pytest.raises(SignatureError, match="no such signature file"):
        engine(tmp_path, signatures=["nope"])


def test_unsupported_file_given_explicitly(tmp_path: Path) -> None:
    (tmp_path / "main.ldb").write_text("x\n")
    with pytest.raises(SignatureError, match="unsupported signature file type"):
        engine(tmp_path, signatures=["main.ldb"])


# -- YARA rules ---------------------------------------------------------------------------

async def test_yara_rules_directory(tmp_path: Path) -> None:
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "a.yar").write_text(
        'rule marker { strings: $m = "TEST-MALWARE" condition: $m }\n')
    # The same identifier in another file: each file has its own namespace.
    (rules / "b.yara").write_text(
        'rule marker { meta: name = "Custom.Named.Rule" strings: $m = "OTHER-THING" '
        "condition: $m }\n")
    (rules / "notes.txt").write_text("rule broken {")  # not a rule file: ignored
    eng = engine(tmp_path, rules=["rules"])
    assert await scan(eng, MARKER) == (ScanStatus.INFECTED, ["marker"])
    assert await scan(eng, b"xx OTHER-THING") == (ScanStatus.INFECTED, ["Custom.Named.Rule"])
    assert await scan(eng, b"nothing") == (ScanStatus.CLEAN, [])


def test_bad_yara_rule(tmp_path: Path) -> None:
    (tmp_path / "bad.yar").write_text("rule broken { condition: nonsense_ident }\n")
    with pytest.raises(SignatureError, match=r"bad\.yar"):
        engine(tmp_path, rules=["bad.yar"])


# -- versions -----------------------------------------------------------------------------

def test_db_version_changes_with_signatures(tmp_path: Path, sigdir: Path) -> None:
    first = engine(tmp_path, signatures=["sigs"]).db_version()
    assert len(first) == 16
    assert engine(tmp_path, signatures=["sigs"]).db_version() == first  # deterministic
    assert engine(tmp_path, signatures=["sigs"], builtin=False).db_version() != first
    with (sigdir / "test.ndb").open("a") as f:
        f.write("Another.One:0:*:41424344454647\n")
    second = engine(tmp_path, signatures=["sigs"])
    assert second.db_version() != first
    assert second.db_version() in second.version()
    assert second.version().startswith("avgate-embedded ")


# -- scanning -----------------------------------------------------------------------------

class UnreadableSpool(Spool):
    """A spool that fails the test if its content is read."""

    def getvalue(self) -> bytes:
        raise AssertionError("content read although over max_scan_size")


async def test_over_max_scan_size_skipped_without_reading(tmp_path: Path) -> None:
    eng = engine(tmp_path, limits=Limits(max_scan_size=100))
    spool = UnreadableSpool(memory_limit=1000)
    spool.write(EICAR * 2)
    spool.finish()
    result = await eng.scan(spool)
    assert result.status is ScanStatus.SKIPPED
    assert result.reason == "size limit: 136 bytes > max_scan_size 100"


async def test_not_started_is_an_error(tmp_path: Path) -> None:
    eng = build_engine(EmbeddedEngineSettings(), EngineContext())
    result = await eng.scan(Spool.from_bytes(EICAR))
    assert result.status is ScanStatus.ERROR
    assert "not started" in result.reason


async def test_start_loads(tmp_path: Path) -> None:
    eng = build_engine(EmbeddedEngineSettings(), EngineContext())
    await eng.start()
    assert eng.db_version()
    assert (await eng.scan(Spool.from_bytes(EICAR))).status is ScanStatus.INFECTED


async def test_large_object_scanned_in_thread(tmp_path: Path, sigdir: Path) -> None:
    eng = engine(tmp_path, signatures=["sigs"])
    data = b"\0" * 200_000 + MARKER + b"\0" * 100
    assert await scan(eng, data) == (ScanStatus.INFECTED, ["Test.Body.Pattern"])


async def test_problems_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Worst problem wins when nothing is found; findings win over problems."""
    eng = engine(tmp_path)

    def fake(data: bytes, limits: Limits, name: str = "") -> Iterator[object]:
        yield content.Part(name, data, 0)
        yield content.Problem("a.zip", ScanStatus.SKIPPED, "ratio limit")
        yield content.Problem("a.zip/b.zip", ScanStatus.UNKNOWN, "encrypted member")
        yield content.Part("a.zip/eicar.com", EICAR if data == b"bad" else b"ok", 1)

    # scan_bytes is what a scan worker runs; patching here reaches it, not the workers
    monkeypatch.setattr(content, "decompose", fake)
    result = eng.scan_bytes(b"good")
    assert result.status is ScanStatus.UNKNOWN
    assert result.reason == "a.zip/b.zip: encrypted member"
    assert len(result.details) == 2
    result = eng.scan_bytes(b"bad")
    assert result.status is ScanStatus.INFECTED
    assert [(f.name, f.part, f.engine) for f in result.findings] == [
        (EICAR_NAME, "a.zip/eicar.com", "embedded")]


async def test_decomposition_crash_is_an_error(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    eng = engine(tmp_path)

    def broken(data: bytes, limits: Limits, name: str = "") -> Iterator[object]:
        yield content.Part(name, data, 0)
        raise ValueError("parser bug")

    monkeypatch.setattr(content, "decompose", broken)
    with pytest.raises(EngineError, match="parser bug"):
        eng.scan_bytes(b"x")  # in a scan worker this becomes an error result


async def test_eicar_in_zip(tmp_path: Path) -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("readme.txt", "hello")
        z.writestr("eicar.com", EICAR)
    result = await engine(tmp_path).scan(Spool.from_bytes(buf.getvalue()))
    assert result.status is ScanStatus.INFECTED
    assert [f.name for f in result.findings] == [EICAR_NAME]
    assert result.findings[0].part.endswith("eicar.com")


async def test_eicar_in_base64_mime_part(tmp_path: Path) -> None:
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = "a@example.org", "b@example.org", "test"
    msg.set_content("see attachment")
    msg.add_attachment(EICAR, maintype="application", subtype="octet-stream",
                       filename="eicar.com")
    raw = msg.as_bytes()
    assert base64.b64encode(EICAR[:30])[:20] in raw  # really base64-encoded
    result = await engine(tmp_path).scan(Spool.from_bytes(raw))
    assert result.status is ScanStatus.INFECTED
    assert [f.name for f in result.findings] == [EICAR_NAME]
    assert result.findings[0].part != ""


async def test_every_object_is_scanned_in_a_worker(tmp_path: Path) -> None:
    """Nothing is decomposed or matched on the event loop: small leaves included."""
    eng = engine(tmp_path)
    await eng.start()
    try:
        assert eng._pool is not None
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as z:
            z.writestr("a.txt", "small")
        for data in (b"small leaf", b"x" * 100_000, buf.getvalue()):
            before = eng._pool.stats().tasks
            await eng.scan(Spool.from_bytes(data))
            assert eng._pool.stats().tasks == before + 1
    finally:
        await eng.close()


# -- the shared corpus ----------------------------------------------------------------------

def test_eicar_constant_matches_corpus() -> None:
    assert EICAR == corpus.EICAR
    assert EICAR_NAME == corpus.EICAR_NAME


@pytest.fixture(scope="module", params=[True, False], ids=["builtin", "signatures-only"])
def corpus_engine(request: pytest.FixtureRequest,
                  tmp_path_factory: pytest.TempPathFactory) -> EmbeddedEngine:
    """The test signature set (EICAR md5 .hdb + MARKER .ndb), with and without the builtin."""
    d = tmp_path_factory.mktemp("corpus-sigs")
    (d / "test.hdb").write_text(f"{EICAR_MD5}:{len(EICAR)}:Eicar-Test-Signature-HDB\n")
    (d / "test.ndb").write_text(corpus.MARKER_NDB)
    return engine(d, signatures=["."], builtin=request.param)


@pytest.mark.parametrize("sample", corpus.corpus(), ids=lambda s: s.name)
async def test_corpus(corpus_engine: EmbeddedEngine, sample: corpus.Sample) -> None:
    result = await corpus_engine.scan(Spool.from_bytes(sample.data))
    assert result.status is sample.expected, result.reason
    if sample.virus is None:
        assert result.findings == ()
    else:
        assert result.findings
        assert all(f.name.startswith(sample.virus) for f in result.findings), result.findings
    if sample.expected in (ScanStatus.SKIPPED, ScanStatus.UNKNOWN):
        assert result.reason


async def test_max_files_reported(tmp_path: Path) -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for i in range(5):
            z.writestr(f"f{i}.txt", f"clean {i}")
        z.writestr("last.com", EICAR)
    eng = engine(tmp_path, limits=Limits(max_files=3))
    result = await eng.scan(Spool.from_bytes(buf.getvalue()))
    assert result.status is ScanStatus.SKIPPED  # EICAR was past the limit: not confirmed clean
    assert "file count limit" in result.reason

"""ClamAV databases in the embedded engine: containers, verification, formats, stats, reload."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import io
import pickle
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yara_x
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from avgate.engines import clamavdb
from avgate.engines import embedded as embedded_mod
from avgate.engines.base import EngineContext
from avgate.engines.clamavdb import (
    CVD_KEY,
    INFO_KEY,
    Unsupported,
    load_database,
    parse_header,
    read_container,
    read_tar,
    translate_ldb,
    update_from_mirror,
    verify_md5_sig,
    verify_sha256_sig,
)
from avgate.engines.embedded import EmbeddedEngine, EmbeddedEngineSettings
from avgate.engines.signatures import HashSignatures, TranslationError
from avgate.errors import SignatureError
from avgate.limits import Limits
from avgate.result import ScanStatus
from avgate.spool import Spool
from tests import corpus
from tests.helpers import async_wait_until

from .test_clamavdb_samples import (
    EXPECTED_UNSUPPORTED,
    TEST_PUBLIC,
    build_container,
    generated_database,
    md5hex,
)

TESTDATA = Path(__file__).parent / "clamav_testdata"
TEST_KEYS: dict[str, Any] = {"cvd_key": TEST_PUBLIC, "info_key": TEST_PUBLIC}


def engine_for(root: Path, **kw: object) -> EmbeddedEngine:
    settings = EmbeddedEngineSettings(clamav_db=(str(root),), **kw)  # type: ignore[arg-type]
    return EmbeddedEngine(settings, EngineContext(base_dir=str(root), workers=1,
                                                  limits=Limits(scan_timeout=30)))


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> tuple[EmbeddedEngine, Path]:
    root = tmp_path_factory.mktemp("clamavdb")
    files, _ = generated_database()
    (root / "test.cud").write_bytes(build_container("cud", files))
    engine = engine_for(root, reload_interval=0)
    engine.load()
    return engine, root


# -- the real key, on ClamAV's own signed test databases -------------------------------------

@pytest.mark.parametrize(("name", "info"), [("bytecode.cvd", "bytecode.info"),
                                            ("test-1.cvd", "test.info")])
def test_clamav_signed_databases_verify(name: str, info: str) -> None:
    container = read_container((TESTDATA / name).read_bytes(), name)
    assert container.verified == ("MD5 and header signature, "
                                  f"{info} signature, member sizes and SHA-256")


def test_real_database_loads_with_counts(tmp_path: Path) -> None:
    db = load_database([TESTDATA])
    assert db.versions() == "bytecode:19 test-1:1"
    # test-1.cvd: an end-of-life body signature for flevel <= 38 and an ldb for a higher one
    lines = "\n".join(db.stats.lines())
    assert "bytecode.cvd/767944.cbc: 0 loaded, 1 unsupported (bytecode 1)" in lines
    assert "test-1.cvd/test.ndb: 0 loaded, 1 skipped (functionality level 1)" in lines
    assert db.stats.total_unsupported() >= 3


def test_real_key_rejects_other_signatures() -> None:
    data = (TESTDATA / "test-1.cvd").read_bytes()
    header = parse_header(data[:512], "x")
    assert verify_md5_sig(header.md5, header.dsig)
    assert not verify_md5_sig(header.md5, header.dsig[:-1] + "a")
    assert not verify_md5_sig(md5hex(b"other"), header.dsig)
    assert not verify_sha256_sig(bytes(32), header.dsig)
    assert not verify_md5_sig(header.md5, "!!!")
    assert CVD_KEY[1] == 100001027 and INFO_KEY[1] == 100002049


# -- container errors ------------------------------------------------------------------------

def _files() -> dict[str, bytes]:
    return {"a.ndb": b"A.B:0:*:41424344\n", "a.hdb": b"%s:4:H\n" % (
        md5hex(b"xyzw").encode())}


def _retar(members: list[tuple[str, bytes]], header: bytes, compress: bool = True) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    body = gzip.compress(buf.getvalue()) if compress else buf.getvalue()
    return header + body


@pytest.mark.parametrize(("mutate", "message"), [
    (lambda d: d[:100], "truncated header"),
    (lambda d: b"NotClamAV" + d[9:], "no ClamAV-VDB header"),
    (lambda d: d.replace(b"ClamAV-VDB:14 Nov 2023 22-13 +0000:1:", b"ClamAV-VDB:x:one:", 1),
     "bad version"),
    (lambda d: d[:600] + b"X" + d[601:], "MD5 mismatch"),
    (lambda d: d[:-200], "MD5 mismatch"),
])
def test_cvd_rejected(mutate: object, message: str) -> None:
    data = build_container("cvd", _files())
    read_container(data, "x.cvd", **TEST_KEYS)
    with pytest.raises(SignatureError, match=message):
        read_container(mutate(data), "x.cvd", **TEST_KEYS)  # type: ignore[operator]


def test_signature_by_another_key_rejected() -> None:
    with pytest.raises(SignatureError, match=r"digital signature verification failed"):
        read_container(build_container("cvd", _files()), "x.cvd")
    with pytest.raises(SignatureError, match=r"incorrect digital signature"):
        read_container(build_container("cld", _files()), "x.cld")


def test_truncated_archives_rejected() -> None:
    cud = build_container("cud", _files())
    with pytest.raises(SignatureError, match=r"truncated gzip|corrupt"):
        read_container(cud[:-30], "x.cud")
    cld = build_container("cld", _files())
    with pytest.raises(SignatureError, match=r"truncated|corrupt|does not match"):
        read_container(cld[:len(cld) // 3], "x.cld", **TEST_KEYS)


def test_info_manifest_enforced() -> None:
    good = read_container(build_container("cud", _files()), "x.cud")
    header = build_container("cud", _files())[:512]
    members = dict(good.members)
    members["a.ndb"] = b"A.B:0:*:41424345\n"  # changed after .info was written
    with pytest.raises(SignatureError, match=r"a.ndb does not match its size/SHA-256"):
        read_container(_retar(list(members.items()), header), "x.cud")
    members = dict(good.members)
    members["extra.hdb"] = b"x"
    with pytest.raises(SignatureError, match=r"extra.hdb is not listed"):
        read_container(_retar(list(members.items()), header), "x.cud")
    members = {k: v for k, v in good.members if not k.endswith(".info")}
    with pytest.raises(SignatureError, match=r"no .info member"):
        read_container(_retar(list(members.items()), header), "x.cud")
    unsigned_cld = build_container("cld", _files(), key=None)
    with pytest.raises(SignatureError, match=r"no digital signature"):
        read_container(unsigned_cld, "x.cld", **TEST_KEYS)
    other_version = build_container("cud", _files(), version=2)[:512]
    with pytest.raises(SignatureError, match=r"header does not match"):
        read_container(_retar(list(good.members), other_version), "x.cud")


def test_tar_bounds() -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        tar.addfile(tarfile.TarInfo("dir/x"), io.BytesIO(b""))
    with pytest.raises(SignatureError, match=r"not allowed"):
        read_tar(buf.getvalue(), "t")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("d")
        info.type = tarfile.DIRTYPE
        tar.addfile(info)
    with pytest.raises(SignatureError, match=r"not a file"):
        read_tar(buf.getvalue(), "t")
    data = _retar([("big.hdb", b"x" * 5000)], b"", compress=False)
    with pytest.raises(SignatureError, match=r"5000 bytes"):
        read_tar(data, "t", max_member=4096)
    with pytest.raises(SignatureError, match=r"more than 0 members"):
        read_tar(data, "t", max_members=0)
    bomb = build_container("cud", {"a.hdb": b"#" * 3_000_000})
    with pytest.raises(SignatureError, match=r"unpacks to more than"):
        read_container(bomb, "x.cud", max_total=1_000_000)


def test_broken_container_refuses_the_database(tmp_path: Path) -> None:
    (tmp_path / "ok.cud").write_bytes(build_container("cud", _files()))
    (tmp_path / "bad.cvd").write_bytes(b"ClamAV-VDB:garbage")
    with pytest.raises(SignatureError, match=r"bad.cvd"):
        load_database([tmp_path])


def test_newer_cld_wins_over_cvd(tmp_path: Path) -> None:
    (tmp_path / "daily.cvd").write_bytes(build_container("cvd", _files(), version=5))
    newer = {"a.ndb": b"New.Sig:0:*:45464748\n"}
    (tmp_path / "daily.cld").write_bytes(build_container("cld", newer, version=6))
    db = load_database([tmp_path], **TEST_KEYS)
    assert db.versions() == "daily:6"
    assert [b.name for b in db.bodies] == ["New.Sig"]
    assert db.stats.skipped[("daily.cvd", "older duplicate container")] == 1


# -- generated database: every supported kind -----------------------------------------------

SAMPLES = generated_database()[1]


@pytest.mark.parametrize("sample", SAMPLES, ids=lambda s: s.label)
def test_generated_signature_detects_its_sample(
        generated: tuple[EmbeddedEngine, Path], sample: object) -> None:
    engine, _ = generated
    found = engine.match_part(sample.data)  # type: ignore[attr-defined]
    assert found == ([sample.name] if sample.name else []), sample  # type: ignore[attr-defined]


@pytest.mark.parametrize("clean", [s for s in corpus.corpus()
                                   if s.expected is ScanStatus.CLEAN], ids=lambda s: s.name)
def test_generated_database_quiet_on_clean_corpus(
        generated: tuple[EmbeddedEngine, Path], clean: corpus.Sample) -> None:
    assert generated[0].match_part(clean.data) == []


def test_generated_database_stats(generated: tuple[EmbeddedEngine, Path]) -> None:
    engine, _ = generated
    lines = engine.stats()
    assert lines[0] == ("hash signatures 4, section hashes 1, allow-list hashes 1, body 9, "
                        "logical 8, ignored names 1")
    text = "\n".join(lines)
    assert "test.cud: version 1, verified: member sizes and SHA-256" in text
    assert "test.cud/test.ldb: 8 loaded, 1 unsupported (pcre 1)" in text
    assert "test.cud/test.ndb: 9 loaded, 1 skipped (ignored 1)" in text
    assert "test.cud/test.cfg: 0 loaded, 1 skipped (engine configuration 1)" in text
    assert {(f.split("/")[-1], r): n for (f, r), n in engine._db.stats.unsupported.items()
            } == EXPECTED_UNSUPPORTED
    assert "test.cud/test.ign2: 0 loaded, 1 skipped (names to ignore, not signatures 1)" in text
    assert lines[-1] == "total: 23 loaded, 1 unsupported, 3 skipped"
    assert engine.version().endswith(" clamav test:1")


def test_cli_prints_counts(generated: tuple[EmbeddedEngine, Path]) -> None:
    from typer.testing import CliRunner

    from avgate.cli import app

    _, root = generated
    config = root / "avgate.toml"
    config.write_text('[[engines]]\ntype = "embedded"\nclamav_db = "."\n')
    result = CliRunner().invoke(app, ["version", "--engines", "--config", str(config)])
    assert result.exit_code == 0, result.output
    assert "embedded: avgate-embedded " in result.output
    assert "clamav test:1" in result.output
    assert "  embedded: test.cud/test.ldb: 8 loaded, 1 unsupported (pcre 1)" in result.output
    result = CliRunner().invoke(app, ["selftest", "--config", str(config)])
    assert result.exit_code == 0, result.output
    assert "  embedded: total: 23 loaded, 1 unsupported, 3 skipped" in result.output


async def test_generated_database_through_workers(
        generated: tuple[EmbeddedEngine, Path]) -> None:
    _, root = generated
    engine = engine_for(root, reload_interval=0)
    await engine.start()
    try:
        for sample in SAMPLES:
            result = await engine.scan(Spool.from_bytes(sample.data))
            assert (result.virus or None) == sample.name, sample.label
        zipped = corpus.make_zip([("inner.exe", SAMPLES[8].data)])
        result = await engine.scan(Spool.from_bytes(zipped))
        assert result.virus == "Test.Section.md5"
    finally:
        await engine.close()


def test_unknown_and_unsupported_files_counted(tmp_path: Path) -> None:
    (tmp_path / "x.ndb").write_text("Good:0:*:41424344\nBad:0:VI:41424344\nNeg:0:*:41!(42|43)44\n"
                                    "Short:0\n")
    (tmp_path / "x.pdb").write_text("R:www.example.com\nR:www.example.org\n")
    (tmp_path / "x.cbc").write_text("bytecode...\n")
    (tmp_path / "p.ndu").write_text("Pua.Sig:0:*:41424344\n")
    (tmp_path / "old.ign").write_text("daily.ndb:12:Good\n")
    (tmp_path / "future.hdb").write_text(
        f"{md5hex(b'x')}:1:Future:999\n{md5hex(b'y')}:1:Now:20\n")
    db = load_database([tmp_path])
    assert dict(db.stats.unsupported) == {
        ("x.ndb", "offset"): 1, ("x.ndb", "hexsig"): 1, ("x.ndb", "malformed"): 1,
        ("x.pdb", "phishing"): 2, ("x.cbc", "bytecode"): 1}
    assert db.stats.skipped[("x.ndb", "ignored")] == 1  # the old .ign format names Good
    assert db.stats.skipped[("p.ndu", "pua = false")] == 1
    assert db.stats.skipped[("future.hdb", "functionality level")] == 1
    assert len(db.hashes) == 1
    pua = load_database([tmp_path], pua=True)
    assert [b.name for b in pua.bodies] == ["Pua.Sig"]


# -- logical signature translation --------------------------------------------------------

@pytest.mark.parametrize(("line", "hits", "misses"), [
    ("L;Target:0;0&1;4142;4344", [b"AB..CD"], [b"AB", b"CD"]),
    ("L;Target:0;(0|1)&2;4142;4344;4546", [b"CD EF"], [b"AB CD"]),
    ("L;Target:0;0=2;4142", [b"AB AB"], [b"AB", b"AB AB AB"]),
    ("L;Target:0;0<2;4142", [b"AB"], [b"AB AB", b"xx"]),
    ("L;Target:0;(0|1)>2,2;4142;4344", [b"AB AB CD"], [b"AB AB AB", b"AB CD"]),
    ("L;Target:0,FileSize:4-6;0;4142", [b"xxAB"], [b"AB", b"xxxxxAB"]),
    ("L;Target:0;0;10:4142", [b"0123456789AB"], [b"AB"]),
    ("L;Target:0;0;4142::iwa", [b"ab", b"a\0B\0"], [b"a\0"]),
    ("L;Target:0;0;4142::f", [b"x AB y"], [b"xAB"]),
])
def test_ldb_translation(line: str, hits: list[bytes], misses: list[bytes]) -> None:
    sig = translate_ldb(line, "t")
    rules = yara_x.compile('import "pe"\nimport "elf"\n' + sig.yara_rule("r0"))
    for data in hits:
        assert rules.scan(data).matching_rules, (line, data)
    for data in misses:
        assert not rules.scan(data).matching_rules, (line, data)


@pytest.mark.parametrize(("line", "kind"), [
    ("L;Target:0;0&1;4142;0/abc/i", "pcre"),
    ("L;Target:0;0&1;4142;0(>>4#ib2#=1234)", "byte-compare"),
    ("L;Target:0;0&1;4142;${1-2}0$", "macro"),
    ("L;Target:0;0;fuzzy_img#af2ad01ed42993c7#0", "fuzzy-image"),
    ("L;Target:0,Container:CL_TYPE_ZIP;0;4142", "target-block"),
    ("L;Target:0;0;VI:4142", "offset"),
    ("L;Target:0;0;EP+0:4142", "offset"),
    ("L;Target:0;0;41!(42|43)", "hexsig"),
    ("L;Target:0;0;41??::i", "modifier"),
    ("L;Target:0;(0&1)>2;4142;4344", "expression"),
    ("L;Target:0;0>2;10:4142", "expression"),
])
def test_ldb_unsupported(line: str, kind: str) -> None:
    with pytest.raises(Unsupported) as exc:
        translate_ldb(line, "t")
    assert exc.value.kind == kind


@pytest.mark.parametrize("line", [
    "L;Target:0;0", "L;Target:0;2;4142", "L;Target:0;0&1|2;41;42;43", "L;Target:0;(0;4142",
    "L;Target:x;0;4142", "L;Target:0;0&;4142", ";Target:0;0;4142",
])
def test_ldb_malformed(line: str) -> None:
    with pytest.raises(TranslationError):
        translate_ldb(line, "t")


# -- compact hash tables --------------------------------------------------------------------

def test_hash_table_many_entries_first_name_wins() -> None:
    table = HashSignatures()
    blobs = [b"blob-%d" % i for i in range(5000)]
    for i, data in enumerate(blobs):
        table.add("md5", len(data), md5hex(data), f"N{i}")
    table.add("md5", len(blobs[7]), md5hex(blobs[7]), "Later")
    table.add("sha256", None, hashlib.sha256(b"any").hexdigest(), "Any")
    clone = pickle.loads(pickle.dumps(table))  # noqa: S301 - our own bytes
    for t in (table, clone):
        assert len(t) == 5002
        assert t.lookup(blobs[7]) == ["N7"]
        assert t.lookup(blobs[4999]) == ["N4999"]
        assert t.lookup(b"blob-x") == []
        assert t.lookup(b"any") == ["Any"]
    big = 20_000_000  # over the bitmap's range: the sorted array of large sizes
    table.add("md5", big, md5hex(b"big"), "Big")
    assert table.lookup(b"big", size=big) == ["Big"]
    assert table.lookup(b"big", size=big + 1) == []
    table.add("md5", 3, md5hex(b"new"), "Added")  # after freezing
    assert table.lookup(b"new") == ["Added"] and table.lookup(blobs[1]) == ["N1"]


# -- config and reload --------------------------------------------------------------------

def test_default_clamav_db(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(embedded_mod, "DEFAULT_CLAMAV_DB", str(tmp_path))
    assert EmbeddedEngine(EmbeddedEngineSettings(), EngineContext()).clamav_paths == []
    (tmp_path / "main.cvd").write_bytes(b"")
    assert EmbeddedEngine(EmbeddedEngineSettings(), EngineContext()).clamav_paths == [tmp_path]
    none = EmbeddedEngine(EmbeddedEngineSettings(clamav_db=()), EngineContext())
    assert none.clamav_paths == []


async def test_reload_swaps_in_new_database_and_refuses_broken_one(tmp_path: Path) -> None:
    target = tmp_path / "daily.cud"
    first = {"a.ndb": b"First.Sig:0:*:%s\n" % b"first-marker".hex().encode()}
    second = {"a.ndb": b"Second.Sig:0:*:%s\n" % b"second-marker".hex().encode()}
    target.write_bytes(build_container("cud", first, version=1))
    engine = engine_for(tmp_path, reload_interval=0.05)
    await engine.start()
    try:
        scan = engine.scan
        assert (await scan(Spool.from_bytes(b"xx first-marker"))).virus == "First.Sig"
        old_version = engine.db_version()
        # scans keep running through the swap: every one has a verdict from one database
        both = b"first-marker second-marker"
        verdicts: list[str] = []
        stop = asyncio.Event()

        async def load() -> None:
            while not stop.is_set():
                result = await scan(Spool.from_bytes(both))
                verdicts.append(result.virus or result.status.value)

        loader = asyncio.create_task(load())
        await async_wait_until(lambda: len(verdicts) > 5)
        target.write_bytes(build_container("cud", second, version=2))
        await async_wait_until(lambda: engine.reloads == 1, timeout=20)
        await async_wait_until(lambda: verdicts[-1] == "Second.Sig")
        stop.set()
        await loader
        assert set(verdicts) == {"First.Sig", "Second.Sig"}, set(verdicts)
        assert engine.db_version() != old_version
        assert engine.version().endswith("clamav daily:2")
        assert (await scan(Spool.from_bytes(b"xx second-marker"))).virus == "Second.Sig"
        assert (await scan(Spool.from_bytes(b"xx first-marker"))).status is ScanStatus.CLEAN
        # a broken update (truncated mid-write) is refused; the old database keeps serving
        good_version = engine.db_version()
        target.write_bytes(build_container("cud", first, version=3)[:-40])
        await async_wait_until(lambda: engine.last_reload_error is not None, timeout=20)
        assert "daily.cud" in engine.last_reload_error[1]  # type: ignore[index]
        assert engine.db_version() == good_version
        assert (await scan(Spool.from_bytes(b"xx second-marker"))).virus == "Second.Sig"
        # the fixed file is picked up
        target.write_bytes(build_container("cud", first, version=3))
        await async_wait_until(lambda: engine.reloads == 2, timeout=20)
        assert engine.last_reload_error is None
        assert (await scan(Spool.from_bytes(b"xx first-marker"))).virus == "First.Sig"
    finally:
        await engine.close()


# -- fuzz: bad input is a SignatureError / TranslationError, nothing else ------------------

_VALID = build_container("cud", _files())


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_fuzz_container(data: st.DataObject) -> None:
    blob = bytearray(_VALID)
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(blob) - 1))
        blob[pos] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(blob)))
    for candidate in (bytes(blob), bytes(blob[:cut])):
        for name in ("x.cud", "x.cvd", "x.cld"):
            try:
                read_container(candidate, name)
            except SignatureError:
                pass


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="0123456789&|()=<>,;:abcdefABCDEF?*{}-!/$ETSPLarget", max_size=60))
def test_fuzz_ldb(text: str) -> None:
    try:
        sig = translate_ldb("N;Target:0;" + text, "t")
    except TranslationError:
        return
    assert sig.name == "N"


def test_entries_yara_x_rejects_are_counted_or_refused(tmp_path: Path) -> None:
    """Database entries YARA-X refuses are counted and left out (found by halving);
    the same in an admin's ``signatures`` file fails the load, naming it."""
    good = [f"Good.{i}:0:*:{(b'<good-%d>' % i).hex()}" for i in range(40)]
    bad = "Huge.Offset:1:EP+99999999999999999999:41424344"
    (tmp_path / "db").mkdir()
    (tmp_path / "db" / "x.ndb").write_text("\n".join([*good[:17], bad, *good[17:]]) + "\n")
    engine = engine_for(tmp_path / "db", reload_interval=0)
    engine.load()
    assert engine._db.stats.unsupported == {("x.ndb", "yara-x"): 1}
    assert engine._db.stats.loaded["x.ndb"] == 40
    assert engine.match_part(b"xx <good-39> yy") == ["Good.39"]
    (tmp_path / "admin.ndb").write_text(bad + "\n")
    strict = EmbeddedEngine(EmbeddedEngineSettings(signatures=("admin.ndb",), clamav_db=()),
                            EngineContext(base_dir=str(tmp_path)))
    with pytest.raises(SignatureError, match=r"admin.ndb:1: Huge.Offset: YARA-X rejects the "
                                             r"translation: .*invalid integer"):
        strict.load()


# -- updates from a private mirror ----------------------------------------------------------

@pytest.fixture
def mirror(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A local HTTP mirror (loopback) serving a directory of .cvd files."""
    import functools
    import http.server
    import threading

    root = tmp_path / "mirror"
    root.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            pass

    handler = functools.partial(Quiet, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/db", root
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def _sig(name: str, marker: bytes) -> dict[str, bytes]:
    return {f"{name.lower()}.ndb": b"%s:0:*:%s\n" % (name.encode(), marker.hex().encode())}


async def test_update_from_mirror_under_load(mirror: tuple[str, Path], tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A newer daily.cvd on the mirror is fetched, verified and swapped in while scans run:
    every scan gets a verdict; a corrupt one on the mirror changes nothing."""
    monkeypatch.setattr(clamavdb, "CVD_KEY", TEST_PUBLIC)
    monkeypatch.setattr(clamavdb, "INFO_KEY", TEST_PUBLIC)
    url, served = mirror
    (served / "db").mkdir()
    datadir = tmp_path / "clamav"
    datadir.mkdir()
    (datadir / "daily.cvd").write_bytes(build_container("cvd", _sig("Old", b"<m1>"), version=1))
    (served / "db" / "daily.cvd").write_bytes(
        build_container("cvd", _sig("New", b"<m2>"), version=2))
    engine = engine_for(datadir, reload_interval=0.05)
    await engine.start()
    try:
        verdicts: list[str] = []
        stop = asyncio.Event()

        async def load() -> None:
            while not stop.is_set():
                result = await engine.scan(Spool.from_bytes(b"<m1> <m2>"))
                verdicts.append(result.virus or result.status.value)

        loader = asyncio.create_task(load())
        await async_wait_until(lambda: len(verdicts) > 3)
        lines = await asyncio.to_thread(update_from_mirror, url, datadir, ("daily",))
        assert lines == ["daily: updated 1 -> 2 (MD5 and header signature, test.info "
                         "signature, member sizes and SHA-256)"]
        await async_wait_until(lambda: engine.reloads == 1, timeout=20)
        await async_wait_until(lambda: verdicts[-1] == "New")
        stop.set()
        await loader
        assert set(verdicts) == {"Old", "New"}
        assert engine.version().endswith("clamav daily:2")
        assert update_from_mirror(url, datadir, ("daily",)) == [
            "daily: version 2 is up to date (mirror: 2)"]
        bad = bytearray(build_container("cvd", _sig("Bad", b"<m3>"), version=3))
        bad[-100] ^= 0xFF
        (served / "db" / "daily.cvd").write_bytes(bytes(bad))
        with pytest.raises(SignatureError, match="MD5 mismatch"):
            update_from_mirror(url, datadir, ("daily",))
        assert clamavdb.parse_header((datadir / "daily.cvd").read_bytes()[:512], "x").version == 2
        assert sorted(p.name for p in datadir.iterdir()) == ["daily.cvd"]
    finally:
        await engine.close()


def test_update_cli_with_mirror(mirror: tuple[str, Path], tmp_path: Path,
                                monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from avgate.cli import app

    monkeypatch.setattr(clamavdb, "CVD_KEY", TEST_PUBLIC)
    monkeypatch.setattr(clamavdb, "INFO_KEY", TEST_PUBLIC)
    url, served = mirror
    (served / "db").mkdir()
    for stem, version in (("main", 5), ("daily", 9), ("bytecode", 1)):
        (served / "db" / f"{stem}.cvd").write_bytes(
            build_container("cvd", _sig(stem.title(), stem.encode()), version=version))
    datadir = tmp_path / "clamav"
    datadir.mkdir()
    (datadir / "main.cvd").write_bytes(build_container("cvd", _sig("Main", b"m"), version=5))
    (datadir / "daily.cld").write_bytes(build_container("cld", _sig("Daily", b"d"), version=8))
    config = tmp_path / "avgate.toml"
    config.write_text(f'[[engines]]\ntype = "embedded"\nclamav_db = "{datadir}"\n')
    result = CliRunner().invoke(app, ["update", "--config", str(config), "--mirror", url])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == [
        "main: version 5 is up to date (mirror: 5)",
        "daily: updated 8 -> 9 (MD5 and header signature, test.info signature, member sizes "
        "and SHA-256)",
        "bytecode: updated nothing -> 1 (MD5 and header signature, test.info signature, "
        "member sizes and SHA-256)"]
    assert sorted(p.name for p in datadir.iterdir()) == ["bytecode.cvd", "daily.cvd",
                                                         "main.cvd"]
    result = CliRunner().invoke(app, ["update", "--config", str(config),
                                      "--mirror", "file:///etc"])
    assert result.exit_code == 1
    assert "must be an http:// or https:// URL" in result.output
    # [update] mirror: the same without the option (offline sites write it once)
    config.write_text(config.read_text() + f'[update]\nmirror = "{url}"\n')
    result = CliRunner().invoke(app, ["update", "--config", str(config)])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[0] == "main: version 5 is up to date (mirror: 5)"


@pytest.mark.parametrize(("falign", "offset", "size", "hashed"), [
    (0x200, 1, 512, (0, 512)),  # clam.exe: offset rounded down, size up
    (0x200, 0x200, 100, (0x200, 0x200)),
    (0x1000, 0x200, 0x200, (0x200, 0x200)),  # 0x200-aligned only: ClamAV falls back to 0x200
    (0x200, 0x400, 0x400, (0x400, 0x300)),  # runs past the end: clipped to the file
    (0, 3, 7, (3, 7)),  # no alignment: as written
])
def test_section_bounds_like_clamav(falign: int, offset: int, size: int,
                                    hashed: tuple[int, int]) -> None:
    data = _blob_bytes(0x700)
    start, length = hashed
    table = HashSignatures()
    table.add("md5", length, md5hex(data[start:start + length]), "Section")
    pe = {"file_alignment": falign, "sections": [
        {"raw_data_offset": offset, "raw_data_size": size},
        {"raw_data_offset": 0x800, "raw_data_size": 0x200},  # starts past the end: none
        "junk"]}
    assert embedded_mod._section_matches(data, pe, table) == ["Section"]
    assert embedded_mod._section_matches(data, None, table) == []


def _blob_bytes(size: int) -> bytes:
    return bytes((i * 7 + i // 251) % 256 for i in range(size))

"""ClamAV signature parsing and translation to YARA-X."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import yara_x
from hypothesis import given, settings
from hypothesis import strategies as st

from avgate.engines.signatures import (
    BodySignature,
    HashSignatures,
    SignatureSet,
    TranslationError,
    parse_hash_line,
    parse_ndb_line,
    translate_hexsig,
    translate_offset,
)
from avgate.errors import SignatureError

# ClamAV hexsig → expected YARA-X hex string, bytes it must match, bytes it must not match.
TRANSLATIONS = [
    ("41424344", "41 42 43 44", [b"xxABCDxx"], [b"ABCE", b"ABC"]),
    ("4142??44", "41 42 ?? 44", [b"AB\x00D", b"ABzD"], [b"ABD", b"AB\x00\x00E"]),
    ("41424?44", "41 42 4? 44", [b"ABOD", b"AB@D"], [b"ABPD"]),
    ("4142?344", "41 42 ?3 44", [b"AB3D", b"ABsD"], [b"AB4D"]),
    ("4142*4344", "41 42 [-] 43 44", [b"ABCD", b"AB" + b"x" * 500 + b"CD"], [b"ACDB"]),
    ("4142{2}4344", "41 42 [2] 43 44", [b"ABxxCD"], [b"ABxCD", b"ABxxxCD"]),
    ("4142{1-3}4344", "41 42 [1-3] 43 44", [b"ABxCD", b"ABxxxCD"], [b"ABCD", b"ABxxxxCD"]),
    ("4142{-2}4344", "41 42 [0-2] 43 44", [b"ABCD", b"ABxxCD"], [b"ABxxxCD"]),
    ("4142{3-}4344", "41 42 [3-] 43 44", [b"ABxxxCD", b"AB" + b"y" * 300 + b"CD"], [b"ABxxCD"]),
    ("4142{0}4344", "41 42 43 44", [b"ABCD"], [b"ABxCD"]),
    ("4142{-0}4344", "41 42 43 44", [b"ABCD"], [b"ABxCD"]),
    ("4142{0-}4344", "41 42 [0-] 43 44", [b"ABCD", b"ABxxCD"], [b"ABxxC"]),
    ("4142[1-2]4344", "41 42 [1-2] 43 44", [b"ABxCD"], [b"ABCD"]),
    ("41(42|43)44", "41 ( 42 | 43 ) 44", [b"ABD", b"ACD"], [b"ADD"]),
    ("41(4243|44)45", "41 ( 42 43 | 44 ) 45", [b"ABCE", b"ADE"], [b"ABE", b"ACE"]),
    ("41(4?|5?)5A", "41 ( 4? | 5? ) 5a", [b"AFZ", b"AQZ"], [b"A0Z"]),
    ("DEADBEEF", "de ad be ef", [b"\xde\xad\xbe\xef"], [b"\xde\xad\xbe\xee"]),
]


def _compile(hexstr: str, condition: str = "$a") -> yara_x.Rules:
    return yara_x.compile(f"rule t {{ strings: $a = {{ {hexstr} }} condition: {condition} }}")


@pytest.mark.parametrize(("clamav", "expected", "hits", "misses"), TRANSLATIONS)
def test_translation_table(clamav: str, expected: str, hits: list[bytes],
                           misses: list[bytes]) -> None:
    translated = translate_hexsig(clamav)
    assert translated == expected
    rules = _compile(translated)
    for data in hits:
        assert rules.scan(data).matching_rules, data
    for data in misses:
        assert not rules.scan(data).matching_rules, data


@pytest.mark.parametrize(("hexsig", "reason"), [
    ("41!(42|43)44", "negated alternatives"),
    ("4142(B)4344", "anchor (B)"),
    ("4142(L)", "anchor (L)"),
    ("414", "odd number of hex digits"),
    ("41(4|43)44", "odd number of hex digits"),
    ("41(42)44", "at least two choices"),
    ("41(42|)44", "empty alternative"),
    ("41(42{2}|43)44", "unsupported token"),
    ("4142{x}43", "bad jump"),
    ("4142{5-2}43", "bad jump range"),
    ("41424g", "unsupported character"),
    ("*4142", "cannot start or end with a jump"),
    ("4142{4}", "cannot start or end with a jump"),
    ("4142(4344", "unclosed '('"),
    ("", "empty signature"),
])
def test_translation_rejects(hexsig: str, reason: str) -> None:
    with pytest.raises(TranslationError, match=reason.replace("(", r"\(").replace(")", r"\)")):
        translate_hexsig(hexsig)


@pytest.mark.parametrize(("offset", "condition", "hits", "misses"), [
    ("*", "$a", [b"ABCD", b"xxABCD"], [b"ABC"]),
    ("0", "$a at 0", [b"ABCDxx"], [b"xABCD"]),
    ("2", "$a at 2", [b"xxABCD"], [b"ABCD", b"xxxABCD"]),
    ("2,3", "$a in (2..5)", [b"xxABCD", b"xxxxxABCD"], [b"xABCD", b"xxxxxxABCD"]),
    ("EOF-4", "$a at filesize - 4", [b"xxABCD"], [b"xxABCDx"]),
    ("EOF-6,2", "$a in (filesize - 6..filesize - 6 + 2)",
     [b"ABCDxx", b"xxABCD"], [b"ABCDxxx"]),
])
def test_offsets(offset: str, condition: str, hits: list[bytes], misses: list[bytes]) -> None:
    assert translate_offset(offset) == condition
    rules = _compile("41 42 43 44", condition)
    for data in hits:
        assert rules.scan(data).matching_rules, data
    for data in misses:
        assert not rules.scan(data).matching_rules, data


@pytest.mark.parametrize("offset", ["EP+0", "EP-10,5", "S1+4", "SL+0", "SE2", "VI", "x", "-1"])
def test_unsupported_offsets(offset: str) -> None:
    with pytest.raises(TranslationError):
        translate_offset(offset)


@pytest.mark.parametrize(("target", "hit", "miss"), [
    (1, b"MZ\x90\x00 ABCD", b"ZM\x90\x00 ABCD"),
    (6, b"\x7fELF ABCD", b"\x7fELG ABCD"),
    (2, b"\xd0\xcf\x11\xe0 ABCD", b"\xd0\xcf\x11\xe1 ABCD"),
    (9, b"\xcf\xfa\xed\xfe ABCD", b"\xcf\xfa\xed\xff ABCD"),
])
def test_magic_targets(target: int, hit: bytes, miss: bytes) -> None:
    sig = BodySignature("T", target, "*", "41424344", "x.ndb", 1)
    rules = yara_x.compile(sig.yara_rule("r0"))
    assert rules.scan(hit).matching_rules
    assert not rules.scan(miss).matching_rules


@pytest.mark.parametrize("target", [0, 3, 4, 5, 7, 10])
def test_other_targets_match_anything(target: int) -> None:
    rules = yara_x.compile(BodySignature("T", target, "*", "41424344", "x.ndb", 1).yara_rule("r0"))
    assert rules.scan(b"plain ABCD").matching_rules


def test_ndb_line_rejection_names_file_line_and_signature() -> None:
    with pytest.raises(SignatureError) as exc:
        parse_ndb_line("Bad.Sig-1:0:*:41!(42|43)44", "/db/x.ndb", 7)
    assert "/db/x.ndb:7: Bad.Sig-1" in str(exc.value)
    assert "negated" in str(exc.value)
    with pytest.raises(SignatureError, match=r"x.ndb:3: Ep.Sig: .*entry point"):
        parse_ndb_line("Ep.Sig:0:EP+0:41424344", "x.ndb", 3)
    with pytest.raises(SignatureError, match=r"x.ndb:4: Short: expected name:target"):
        parse_ndb_line("Short:0:41424344", "x.ndb", 4)
    with pytest.raises(SignatureError, match="bad target type"):
        parse_ndb_line("T:pe:*:41424344", "x.ndb", 5)


def test_ndb_line_with_flevels() -> None:
    sig = parse_ndb_line("Test.Body.Pattern:0:*:41424344:51:255", "x.ndb", 1)
    assert (sig.name, sig.target, sig.offset, sig.hexsig) == (
        "Test.Body.Pattern", 0, "*", "41424344")


@pytest.mark.parametrize(("line", "kind", "size"), [
    ("44d88612fea8a8f36de82e1278abb02f:68:Eicar-HDB", "md5", 68),
    ("3395856ce81f2b7382dee72602f798b642f14140:68:Eicar-SHA1", "sha1", 68),
    ("275a021bbfb6489e54d471899f7db9d1663fc695ec2fe2a2c4538aabf651fd0f:*:Eicar-SHA256:73",
     "sha256", None),
    ("44D88612FEA8A8F36DE82E1278ABB02F:*:Eicar-Upper", "md5", None),
])
def test_parse_hash_line(line: str, kind: str, size: int | None) -> None:
    k, s, digest, _name = parse_hash_line(line, "x.hsb", 1)
    assert (k, s) == (kind, size)
    assert digest == digest.lower()


@pytest.mark.parametrize(("line", "reason"), [
    ("44d88612:68:Short", "not an md5, sha1 or sha256"),
    ("zz" * 16 + ":68:NotHex", "not an md5, sha1 or sha256"),
    ("44d88612fea8a8f36de82e1278abb02f:sixty:Name", "bad size"),
    ("44d88612fea8a8f36de82e1278abb02f:68", "expected digest:size:name"),
    ("44d88612fea8a8f36de82e1278abb02f:68:", "empty signature name"),
])
def test_hash_line_rejections(line: str, reason: str) -> None:
    with pytest.raises(SignatureError, match=reason) as exc:
        parse_hash_line(line, "db/x.hdb", 12)
    assert "db/x.hdb:12:" in str(exc.value)


def test_hash_lookup_by_size_and_wildcard() -> None:
    data = b"some content"
    other = b"other stuff!"  # same size, different digest
    hashes = HashSignatures()
    hashes.add("md5", len(data), hashlib.md5(data, usedforsecurity=False).hexdigest(), "M")
    hashes.add("sha1", None, hashlib.sha1(data, usedforsecurity=False).hexdigest(), "S1")
    hashes.add("sha256", len(data) + 1, hashlib.sha256(data).hexdigest(), "WrongSize")
    assert len(hashes) == 3
    assert sorted(hashes.lookup(data)) == ["M", "S1"]
    assert hashes.lookup(other) == []


def test_signature_set_load_file(tmp_path: Path) -> None:
    ndb = tmp_path / "a.ndb"
    ndb.write_text("# comment\n\nA.B:0:*:41424344\nC.D:0:0:45464748\n")
    hdb = tmp_path / "a.hdb"
    hdb.write_text("44d88612fea8a8f36de82e1278abb02f:68:E\n")
    sigs = SignatureSet()
    assert sigs.load_file(ndb) == ndb.read_bytes()
    sigs.load_file(hdb)
    assert [b.name for b in sigs.bodies] == ["A.B", "C.D"]
    assert [b.line for b in sigs.bodies] == [3, 4]
    assert len(sigs.hashes) == 1
    with pytest.raises(SignatureError, match=r"unsupported signature file type \.ldb"):
        sigs.load_file(tmp_path / "x.ldb")
    with pytest.raises(SignatureError, match="cannot read"):
        sigs.load_file(tmp_path / "missing.ndb")


@settings(max_examples=60, deadline=None)
@given(head=st.binary(min_size=2, max_size=12), tail=st.binary(min_size=2, max_size=12),
       gap=st.binary(max_size=20))
def test_translated_sig_matches_its_bytes(head: bytes, tail: bytes, gap: bytes) -> None:
    """head*tail matches head + any gap + tail, embedded anywhere; head{len}tail too."""
    data = b"prefix" + head + gap + tail + b"suffix"
    for hexsig in (f"{head.hex()}*{tail.hex()}", f"{head.hex()}{{{len(gap)}}}{tail.hex()}"):
        rules = _compile(translate_hexsig(hexsig))
        assert rules.scan(data).matching_rules

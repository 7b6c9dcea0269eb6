from avgate.result import EngineInfo, Finding, ScanResult, ScanStatus, merge, worst

S = ScanStatus


def r(status: ScanStatus, *names: str, reason: str = "") -> ScanResult:
    return ScanResult(status, tuple(Finding(n, "e") for n in names), reason=reason,
                      engines=(EngineInfo("e", "1"),))


def test_worst_order():
    assert worst([]) is S.CLEAN
    assert worst([S.CLEAN, S.SKIPPED]) is S.SKIPPED
    assert worst([S.SKIPPED, S.UNKNOWN]) is S.UNKNOWN
    assert worst([S.UNKNOWN, S.ERROR, S.CLEAN]) is S.ERROR
    assert worst([S.ERROR, S.INFECTED]) is S.INFECTED


def test_merge_infected_wins_and_keeps_findings():
    m = merge([r(S.ERROR, reason="down"), r(S.INFECTED, "X"), r(S.CLEAN)], sha256="ab", size=3)
    assert m.status is S.INFECTED and m.virus == "X" and m.reason == ""
    assert m.sha256 == "ab" and m.size == 3 and len(m.engines) == 3


def test_merge_never_turns_problems_into_clean():
    for bad in (S.SKIPPED, S.UNKNOWN, S.ERROR):
        m = merge([r(S.CLEAN), r(bad, reason="why")])
        assert m.status is bad and m.reason == "why"


def test_merge_empty_is_error():
    assert merge([]).status is S.ERROR


def test_to_dict_shape():
    d = r(S.INFECTED, "Eicar-Test-Signature").with_(elapsed=0.0123).to_dict()
    assert d["status"] == "infected" and d["infected"] is True
    assert d["findings"] == [{"name": "Eicar-Test-Signature", "engine": "e", "part": ""}]
    assert d["engines"] == [{"name": "e", "version": "1"}]
    assert d["elapsed_ms"] == 12.3


def test_virus_names_deduplicated_in_order():
    assert r(S.INFECTED, "B", "A", "B").virus_names == ("B", "A")

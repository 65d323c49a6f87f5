"""The crash ledger's journal of in-process decode calls (pipeline/data/crash_ledger.py), file by file:
a call that never returned is, at the next start, a ledger entry (one sample) or suspects (several),
seen by every rank, converted only by the rank that wrote it."""

import json

from hiervl.data.crash_ledger import CrashLedger


def test_a_journal_left_by_a_dead_call_becomes_a_ledger_entry_or_suspects(tmp_path):
    ledger = CrashLedger(tmp_path, 1)
    with ledger.inflight([("a", "s0.tar")], "DALI cpu", epoch=0, position=8):
        assert json.loads((tmp_path / "crash_ledger" / "inflight-rank1.json").read_text())["samples"] == [["a", "s0.tar"]]
    assert not (tmp_path / "crash_ledger" / "inflight-rank1.json").exists()  # returned: nothing left
    assert CrashLedger(tmp_path, 0).entries == {} and not CrashLedger(tmp_path, 0).suspects

    # rank 1 dies inside a call of one sample, rank 0 inside a call of three
    (tmp_path / "crash_ledger" / "inflight-rank1.json").write_text(json.dumps(
        {"samples": [["a", "s0.tar"]], "decoder": "DALI cpu", "epoch": 0, "position": 8}))
    (tmp_path / "crash_ledger" / "inflight-rank0.json").write_text(json.dumps(
        {"samples": [["b", "s1.tar"], ["c", "s1.tar"], ["d", "s2.tar"]], "decoder": "DALI mixed", "epoch": 1, "position": 16}))

    seen_by_2 = CrashLedger(tmp_path, 2)  # a rank that wrote neither: reads both, converts neither
    assert seen_by_2.reason("a").startswith("the process died decoding it in-process (DALI cpu)")
    assert seen_by_2.suspects == {"b", "c", "d"} and seen_by_2.reason("b") is None
    assert (tmp_path / "crash_ledger" / "inflight-rank0.json").exists()
    assert (tmp_path / "crash_ledger" / "inflight-rank1.json").exists()

    r1 = CrashLedger(tmp_path, 1)  # converts its own: a durable ledger line, the journal gone
    assert not (tmp_path / "crash_ledger" / "inflight-rank1.json").exists()
    rows = [json.loads(x) for x in (tmp_path / "crash_ledger" / "rank1.jsonl").read_text().splitlines()]
    assert [(r["key"], r["shard"], r["epoch"], r["position"]) for r in rows] == [("a", "s0.tar", 0, 8)]
    assert r1.is_suspect("c") and not r1.is_suspect("a")

    r0 = CrashLedger(tmp_path, 0)  # converts its own: the three become a suspects file, decoded alone from now on
    assert not (tmp_path / "crash_ledger" / "inflight-rank0.json").exists()
    assert len(list((tmp_path / "crash_ledger").glob("suspects-rank0-*.json"))) == 1
    assert r0.suspects == {"b", "c", "d"} and r0.reason("a") is not None

    later = CrashLedger(tmp_path, 0)  # a later start sees the same without any journal
    assert later.suspects == {"b", "c", "d"} and set(later.entries) == {"a"}
    assert later.summary() == {"a": {"shard": "s0.tar", "reason": rows[0]["reason"]}}

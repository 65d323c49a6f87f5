"""One manifest reader, one policy (dataprep/sources.py): a BOM is not part of a column name; a
bad cell quarantines its row with the row number and column; a file that is not rows refuses the
whole manifest in one line naming file:row and the fix."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hiervl.dataprep.sources import Sample, check_samples, read_manifest
from hiervl.errors import UserError


def _reasons(path):
    good, bad = check_samples(read_manifest(path))
    return [s.orig_key for s in good], {r.key: r.reason for r in bad}


def test_csv_and_jsonl_with_a_utf8_bom_keep_the_first_column(tmp_path):
    """Item 5: Excel's "CSV UTF-8" starts with a BOM; the first column must stay `key`."""
    (tmp_path / "m.csv").write_bytes("key,video,caption\nk1,a.webm,one\nk2,b.webm,two\n".encode("utf-8-sig"))
    samples = read_manifest(tmp_path / "m.csv")
    assert [s.key for s in samples] == ["k1", "k2"]  # not the file stems "a", "b"
    (tmp_path / "t.tsv").write_bytes("key\tvideo\tcaption\nk1\ta.webm\tone\n".encode("utf-8-sig"))
    assert [s.key for s in read_manifest(tmp_path / "t.tsv")] == ["k1"]
    (tmp_path / "m.jsonl").write_bytes((json.dumps({"key": "j1", "video": "a.webm", "caption": "x"}) + "\n")
                                       .encode("utf-8-sig"))
    assert [s.key for s in read_manifest(tmp_path / "m.jsonl")] == ["j1"]


def test_non_string_captions_are_quarantined_with_row_and_column(tmp_path):
    """Item 6: 42, [null], {"a": 1}, true never become the strings "42", "None", "{'a': 1}"."""
    rows = [{"key": "ok", "video": "a.webm", "caption": "a dog runs"},
            {"key": "num", "video": "a.webm", "caption": 42},
            {"key": "nul", "video": "a.webm", "caption": [None]},
            {"key": "obj", "video": "a.webm", "caption": {"a": 1}},
            {"key": "boo", "video": "a.webm", "caption": True},
            {"key": "mix", "video": "a.webm", "caption": ["fine", 3]},
            {"key": "lst", "video": "a.webm", "caption": ["one", "two"]}]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    good, reasons = _reasons(tmp_path / "m.jsonl")
    assert good == ["ok", "lst"]
    assert reasons["num"] == "bad manifest cell (row 2, column caption: a number (42) is not a caption; " \
                             "give a string or a list of strings)"
    assert reasons["nul"].startswith("bad manifest cell (row 3, column caption: a caption list holds null")
    assert reasons["obj"].startswith("bad manifest cell (row 4, column caption: an object ({'a': 1})")
    assert "row 5, column caption: a bool" in reasons["boo"] and "row 6, column caption" in reasons["mix"]
    # a CSV cell is text, so 42 there is the caption "42"; a JSON list in the text is still checked
    (tmp_path / "m.csv").write_text('key,video,caption\nt,a.webm,42\nu,a.webm,"[null]"\n')
    good, reasons = _reasons(tmp_path / "m.csv")
    assert good == ["t"] and "row 3, column caption: a caption list holds null" in reasons["u"]
    # Parquet: a struct column and a list<int> column
    pq.write_table(pa.table({"key": ["s1", "s2"], "video": ["a.webm", "b.webm"],
                             "caption": pa.array([{"text": "x"}, {"text": "y"}])}), tmp_path / "s.parquet")
    good, reasons = _reasons(tmp_path / "s.parquet")
    assert good == [] and reasons["s2"].startswith("bad manifest cell (row 2, column caption: an object")
    pq.write_table(pa.table({"key": ["i1"], "video": ["a.webm"], "caption": pa.array([[1, 2]])}),
                   tmp_path / "i.parquet")
    assert "row 1, column caption: a caption list holds a number (1)" in _reasons(tmp_path / "i.parquet")[1]["i1"]


def test_bad_times_are_quarantined_and_bad_structure_refuses_the_file(tmp_path):
    """Item 9: non-numeric start/end, a JSON array manifest, a scalar JSONL line: no traceback."""
    (tmp_path / "t.csv").write_text("key,video,caption,start,end\nok,a.webm,x,1.0,2.0\nbad,a.webm,x,abc,2\n"
                                    "inf,a.webm,x,0,inf\nneg,a.webm,x,-1,2\nwide,a.webm,x,1,2,3\n")
    good, reasons = _reasons(tmp_path / "t.csv")
    assert good == ["ok"]
    assert reasons["bad"] == "bad manifest cell (row 3, column start: 'abc' is not a number of seconds)"
    assert reasons["inf"] == "bad manifest cell (row 4, column end: 'inf' is not a finite number of seconds)"
    assert reasons["neg"].startswith("bad manifest cell (row 5, column start: '-1' is negative")
    assert reasons["wide"].startswith("bad manifest cell (row 6, 6 cells but the header has 5")
    (tmp_path / "o.jsonl").write_text(json.dumps({"key": "o", "video": "a.webm", "caption": "x",
                                                  "start": {"s": 1}}) + "\n")
    assert _reasons(tmp_path / "o.jsonl")[1]["o"].startswith("bad manifest cell (row 1, column start: an object")
    # a JSON list of objects is a manifest
    (tmp_path / "a.json").write_text(json.dumps([{"key": "a1", "video": "a.webm", "caption": "x"},
                                                 {"key": "a2", "video": "b.webm", "caption": ["y", "z"]}]))
    assert [(s.key, s.captions) for s in read_manifest(tmp_path / "a.json")] == [("a1", ["x"]), ("a2", ["y", "z"])]
    # ... a JSON list holding something else, a scalar JSONL line and broken JSON refuse the file
    cases = {"b.json": (json.dumps([{"video": "a.webm", "caption": "x"}, 7]),
                        r"b\.json:2: element is a number \(7\), not an object; write each row as"),
             "s.jsonl": (json.dumps({"video": "a.webm", "caption": "x"}) + "\n42\n",
                         r"s\.jsonl:2: line is a number \(42\), not an object"),
             "l.jsonl": ('["a.webm", "x"]\n', r"l\.jsonl:1: line is a list"),
             "c.json": ('[{"video": "a.webm", "caption": "x"},\n {"video": }]', r"c\.json:2: not valid JSON"),
             "d.jsonl": ('{"video": "a.webm"\n', r"d\.jsonl:1: not valid JSON .*one object per line")}
    for name, (text, message) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(UserError, match=message):
            read_manifest(tmp_path / name)
    (tmp_path / "h.csv").write_text("path,text\na,b\n")
    with pytest.raises(UserError, match="needs columns 'video' and 'caption'"):
        read_manifest(tmp_path / "h.csv")


def test_negative_clip_times_are_refused_from_every_source():
    """Item 7: a negative start was padded with a frozen first frame; any reader's Sample is checked."""
    good, bad = check_samples([Sample("a", "v.webm", ["x"], start=-0.5, end=2.0), Sample("b", "v.webm", ["x"]),
                               Sample("c", "v.webm", ["x"], start=1.0, end=-3.0)])
    assert [s.key for s in good] == ["b"]
    assert [(r.key, r.stage) for r in bad] == [("a", "input"), ("c", "input")]
    assert bad[0].reason.startswith("negative clip time (start -0.5, end 2.0)")


def test_more_hostile_manifests_refuse_in_one_line(tmp_path):
    """Found by trying: a header naming a column twice (the second silently won), a corrupt
    Parquet file (a traceback); and `--out` that is a file (a traceback)."""
    (tmp_path / "d.csv").write_text("video,caption,caption\na.webm,one,two\n")
    with pytest.raises(UserError, match=r"d\.csv:1: column caption appears more than once in the header"):
        read_manifest(tmp_path / "d.csv")
    (tmp_path / "p.parquet").write_bytes(b"PAR1 this is not parquet PAR1")
    with pytest.raises(UserError, match=r"p\.parquet: not a readable Parquet file"):
        read_manifest(tmp_path / "p.parquet")
    # a bad cell in a row whose other cells are not UTF-8: still one quarantine row that can be written
    (tmp_path / "u.csv").write_bytes(b"key,video,caption,start\nk\xff,a.webm,x,abc\n")
    (bad,) = check_samples(read_manifest(tmp_path / "u.csv"))[1]
    assert bad.key == "k\\udcff" and bad.reason.startswith("bad manifest cell (row 2, column start")
    pa.Table.from_pylist([bad.to_dict()])  # would raise on a lone surrogate
    from hiervl.config import Config
    from hiervl.dataprep.driver import prepare
    (tmp_path / "m.csv").write_text("video,caption\na.webm,x\n")
    (tmp_path / "taken").write_text("a file")
    with pytest.raises(UserError, match="is a file, not a folder"):
        prepare(Config(), tmp_path / "m.csv", tmp_path / "taken", progress=False)

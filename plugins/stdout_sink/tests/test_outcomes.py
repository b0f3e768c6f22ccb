"""Each record says what became of its file, in both formats: detected, clean (and by which engines),
NOT SCANNED with the reason, or ERROR; a file nobody read is never shown as clean."""

import json
import subprocess
import sys

from elkscan_core.testing import eicar

ELKSCAN = [sys.executable, "-m", "elkscan_core.cli"]


def scan(*args):
    return subprocess.run([*ELKSCAN, "scan", "--all", "--no-cache", *args], capture_output=True, text=True,
                          timeout=120)


def test_json_and_table_show_each_outcome(tmp_path):
    (tmp_path / "eicar.com").write_bytes(eicar())
    (tmp_path / "notes.txt").write_text("nothing to see\n")
    (tmp_path / "big.sh").write_bytes(b"#" * (2 << 20))  # over --max-size: no engine reads it
    out = scan(str(tmp_path), "--max-size", "1MiB", "-f", "jsonl")
    assert out.returncode == 1, out.stderr
    records = {r["path"].rsplit("/", 1)[1]: r for r in map(json.loads, out.stdout.splitlines())}
    assert records["eicar.com"]["status"] == "detected" and "yara" in records["eicar.com"]["judged_by"]
    assert records["notes.txt"]["status"] == "clean" and "yara" in records["notes.txt"]["judged_by"]
    big = records["big.sh"]
    assert (big["status"], big["reason"], big["judged_by"]) == ("not_scanned", "above max_size", [])
    assert all("reason" not in r for name, r in records.items() if name != "big.sh")

    table = scan(str(tmp_path), "--max-size", "1MiB", "-f", "table").stdout.splitlines()
    assert table[0].split() == ["RESULT", "SIGNATURE", "ENGINE", "PATH"]
    rows = {row.rsplit("/", 1)[1]: row.split()[:-1] for row in table[1:]}
    assert rows["big.sh"] == ["NOT", "SCANNED", "(above", "max_size)"]
    assert rows["notes.txt"][0] == "clean" and "yara" in rows["notes.txt"][1].split(",")
    assert rows["eicar.com"][0] == "detected"

"""Neutral records -> Elkeid data types and field sets (docs/elkeid-protocol.md section 4)."""

from __future__ import annotations

import json

from elkscan_core import FILE_EVENT, FINDING, LOG, RANSOM_EVENT, TASK_DONE, Detection, Job, Outcome, Record, Target
from elkscan_elkeid_transport.mapping import DB_VERSION, RANSOM_STATUS, SCAN_PROGRESS, TASK_RESULT, to_elkeid

FILE_FACTS = {"exe_size": 68, "exe_hash": "c0fef36a98a20b3e", "md5_hash": "44d88612fea8a8f36de82e1278abb02f",
              "create_at": 1_700_000_000, "modify_at": 1_700_000_001}
PROCESS = {"pid": 42, "ppid": 1, "pgid": 42, "tgid": 42, "argv": "/x -v", "comm": "x", "sessionid": 42, "uid": 0,
           "pns": 4026531836, "docker_id": ""}
YARA_HIT = Detection.from_signature("yara", "Php_Webshell_Generic_Eval", yara_rule=True, hit_data=("$a,1024,12", "$b,0,5"))
CLAM_HIT = Detection.from_signature("clamav", "Unix.Trojan.Mirai-9941418-0.UNOFFICIAL")


def finding(**kwargs) -> Record:
    target = kwargs.pop("target", Target(path="/var/www/x.php", origin="dirscan"))
    return Record(kind=kwargs.pop("kind", FINDING), target=target, **kwargs)


def test_a_file_hit_is_6001_with_the_file_set_and_hit_data():
    data_type, fields = to_elkeid(finding(detections=[YARA_HIT], facts=FILE_FACTS))
    assert data_type == 6001
    assert fields == {"types": "Php", "class": "Webshell", "name": "Generic_Eval", "exe": "/var/www/x.php",
                      "static_file": "/var/www/x.php", "exe_size": "68", "exe_hash": "c0fef36a98a20b3e",
                      "md5_hash": "44d88612fea8a8f36de82e1278abb02f", "create_at": "1700000000",
                      "modify_at": "1700000001", "hit_data": '["$a,1024,12","$b,0,5"]'}
    _, clam = to_elkeid(finding(detections=[CLAM_HIT], token="tok"))
    assert (clam["types"], clam["class"], clam["name"], clam["token"]) == ("Unix", "Trojan", "Mirai-9941418-0", "tok")
    assert "hit_data" not in clam  # only when a YARA rule matched
    assert clam["exe_hash"] == "-3" and clam["md5_hash"] == ""  # unmeasured facts, as Elkeid sends them


def test_a_process_hit_is_6002_with_the_process_set():
    target = Target(path="/tmp/.x/kworker", origin="procscan", pid=42, size=1000)
    data_type, fields = to_elkeid(finding(target=target, detections=[CLAM_HIT], facts={**FILE_FACTS, **PROCESS}))
    assert data_type == 6002
    assert fields["exe"] == "/tmp/.x/kworker" and fields["pid"] == "42" and fields["pns"] == "4026531836"
    assert "docker_id" not in fields
    _, bare = to_elkeid(finding(target=target, detections=[CLAM_HIT]))
    assert bare["pid"] == "42" and bare["ppid"] == "-3" and bare["exe_size"] == "1000"


def test_clean_and_failed_findings_are_no_6001():
    assert to_elkeid(finding()) is None  # clean files never produce 6001/6002
    failed = finding(errors=[Outcome("clamav", "failed", message="clamd is gone", target="/var/www/x.php")])
    assert to_elkeid(failed) is None  # nor failed ones: the sink sums them up per task (test_sink.py)


def test_a_task_result_is_6003_clean_or_not_with_the_task_keys_overriding():
    job = Job(token="t")
    target = Target(path="/srv/dir/a.php", kind=TASK_RESULT, job=job, report_clean=True,
                    extra={"exe": "/srv/dir", "custom": "1"})
    data_type, fields = to_elkeid(Record(kind=TASK_RESULT, target=target, token="t", facts=FILE_FACTS))
    assert data_type == 6003
    assert (fields["types"], fields["class"], fields["name"]) == ("not_detected", "", "")
    assert (fields["exe"], fields["static_file"], fields["custom"], fields["token"], fields["error"]) == (
        "/srv/dir", "/srv/dir/a.php", "1", "t", "")
    failed = Record(kind=TASK_RESULT, target=target, token="t", errors=[Outcome("yara", "timeout", message="5s")])
    assert to_elkeid(failed)[1]["error"] == "yara: timeout: 5s"


def test_task_keys_never_replace_error_token_or_hit_data_in_a_6003():
    """Audit #13: Elkeid inserts error, token and hit_data after the task's keys."""
    keys = {"token": "forged", "error": "", "hit_data": "[]", "name": "task-name"}
    target = Target(path="/srv/a.php", kind=TASK_RESULT, report_clean=True, extra=keys)
    hit = Detection.from_signature("yara", "Php_Webshell_X", yara_rule=True, hit_data=("$a,0,5",))
    failed = Outcome("clamav", "failed", message="clamd is gone")
    _, fields = to_elkeid(Record(kind=TASK_RESULT, target=target, token="t", detections=(hit,), errors=(failed,)))
    assert (fields["token"], fields["error"], fields["hit_data"]) == ("t", "clamav: failed: clamd is gone",
                                                                      '["$a,0,5"]')
    assert fields["name"] == "task-name"  # the file set's own fields are still overridden
    _, clean = to_elkeid(Record(kind=TASK_RESULT, target=target, token="t"))
    assert clean["hit_data"] == "[]"  # no match: nothing to protect, the key is echoed back as Elkeid does


def test_events_and_statuses():
    assert to_elkeid(Record(kind=TASK_DONE, facts={"status": "succeed", "msg": ""}, token="t")) == (
        6000, {"status": "succeed", "msg": "", "token": "t"})
    assert to_elkeid(Record(kind=DB_VERSION, facts={"version": "2026", "exe_hash": "ab" * 32})) == (
        6010, {"version": "2026", "exe_hash": "ab" * 32})
    assert to_elkeid(Record(kind=RANSOM_STATUS, facts={"status": "on"})) == (6011, {"status": "on"})
    writer = Target(path="/usr/bin/shred", origin="fanotify", pid=42)
    data_type, fields = to_elkeid(Record(kind=RANSOM_EVENT, target=writer, facts={
        **PROCESS, **FILE_FACTS, "file_path": "/root/elkeid_targets/0_elkeid_hids_anti_ransom.txt", "file_mask": 8}))
    assert data_type == 6005
    assert (fields["types"], fields["class"], fields["file_mask"]) == ("not_detected", "anti_ransom", "8")
    _, hit = to_elkeid(Record(kind=RANSOM_EVENT, target=writer, detections=[CLAM_HIT]))
    assert (hit["types"], hit["class"]) == ("Unix", "anti_ransom")
    data_type, fields = to_elkeid(Record(kind=FILE_EVENT, target=writer, facts={
        **PROCESS, "exe_size": 10, "create_at": 0, "modify_at": 5, "docker_id": "ab12", "file_path": "/usr/bin/x",
        "file_hash": "00" * 32, "file_mask": 8, "extra": "dropped"}))
    assert data_type == 6012
    assert set(fields) == {"exe", "exe_size", "create_at", "modify_at", "pid", "ppid", "pgid", "tgid", "argv", "comm",
                           "sessionid", "uid", "pns", "docker_id", "file_path", "file_hash", "file_mask"}
    assert fields["exe"] == "/usr/bin/shred" and fields["docker_id"] == "ab12"


def test_logs_progress_and_unknown_kinds():
    data_type, fields = to_elkeid(Record(kind=LOG, facts={"level": "ERROR", "target": "m", "file": "f.py",
                                                          "line": 7, "msg": "boom"}))
    assert (data_type, fields) == (1010, {"level": "ERROR", "target": "m", "file": "f.py", "line": "7", "msg": "boom"})
    data_type, fields = to_elkeid(Record(kind=SCAN_PROGRESS, token="t", facts={"scanned": 5, "phase": "files"}))
    assert data_type == 6058 and fields == {"scanned": "5", "phase": "files", "token": "t"}
    assert to_elkeid(Record(kind="something_new")) is None
    assert json.loads(to_elkeid(finding(detections=[YARA_HIT]))[1]["hit_data"]) == ["$a,1024,12", "$b,0,5"]


def test_a_task_file_no_engine_read_says_so_in_the_6003_error_never_a_bare_clean():
    target = Target(path="/srv/big.iso", origin="elkeid", kind=TASK_RESULT, report_clean=True)
    data_type, fields = to_elkeid(finding(kind=TASK_RESULT, target=target, token="t",
                                          skipped="above clamav's max_file_size; above yara's max_file_size"))
    assert data_type == 6003
    assert fields["error"] == "not scanned: above clamav's max_file_size; above yara's max_file_size"
    failed = Outcome("yara", "failed", message="boom", target="/srv/big.iso")
    _, both = to_elkeid(finding(kind=TASK_RESULT, target=target, errors=[failed], skipped="above x"))
    assert both["error"] and "not scanned" not in both["error"]  # the engine's failure says more

"""The real packaged ``scanner``, started exactly as Elkeid's agent starts it (see conftest.Agent)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import time


from elkscan_core.testing import SAMPLES, write_samples

FILE_SET = {"types", "class", "name", "exe", "static_file", "exe_size", "exe_hash", "md5_hash", "create_at",
            "modify_at"}
DETECTED = sum(1 for _, rule in SAMPLES.values() if rule)
PROCESS_SET = {"pid", "ppid", "pgid", "tgid", "argv", "comm", "sessionid", "uid", "pns"}


def by_type(records, data_type):
    return [r for r in records if r.data_type == data_type]


def test_6053_directory_reports_every_file_with_the_task_keys_then_6000(start_agent, plugin_dir, tmp_path):
    plugin_dir.configure(clamav=True)  # the shipped pipeline whole: clamd (when installed) and YARA
    target = tmp_path / "web"
    write_samples(target)
    (target / "sub").mkdir()
    (target / "sub" / "eicar-depth2.com").write_bytes(SAMPLES["eicar.com"][0])
    (target / "sub" / "deeper").mkdir()
    (target / "sub" / "deeper" / "eicar-depth3.com").write_bytes(SAMPLES["eicar.com"][0])  # below depth 2
    (target / "tiny").write_bytes(b"1234")  # 4 bytes: skipped
    outside = tmp_path / "outside.php"
    outside.write_bytes(SAMPLES["webshell.php"][0])
    os.symlink(outside, target / "linked.php")  # links are followed

    agent = start_agent()
    agent.send(6053, {"exe": str(target), "task_id": "t-42", "static_file": "overridden"}, token="tok-6053")
    done = agent.done("tok-6053")
    assert done.fields == {"status": "succeed", "msg": "", "token": "tok-6053"}
    records = agent.records
    results = by_type(records, 6003)
    assert records.index(done) > max(records.index(r) for r in results)  # every 6003 before the 6000
    # task keys override: exe is the requested directory, and static_file here the task's own value
    assert all(r.fields["exe"] == str(target) and r.fields["task_id"] == "t-42" and r.fields["token"] == "tok-6053"
               and r.fields["static_file"] == "overridden" and r.fields["error"] == "" for r in results)
    assert len(results) == len(SAMPLES) + 2  # the samples, sub/eicar-depth2.com, linked.php
    for r in results:
        assert FILE_SET | {"error", "token", "task_id"} <= set(r.fields)
        assert len(r.fields["exe_hash"]) == 16 and len(r.fields["md5_hash"]) == 32
    hits = [r for r in results if r.fields["types"] != "not_detected"]
    assert len(hits) == DETECTED + 2
    assert all(r.fields["types"] and r.fields["class"] and r.fields["name"] for r in hits)
    assert sum("eicar" in r.fields["name"].lower() for r in hits) == 2
    assert all(r.fields["class"] == "" and r.fields["name"] == "" and "hit_data" not in r.fields
               for r in results if r.fields["types"] == "not_detected")
    assert all(json.loads(r.fields["hit_data"]) for r in hits if "hit_data" in r.fields)  # YARA string matches
    assert agent.close() == 0


def test_6053_single_file_and_every_error_message(start_agent, tmp_path):
    sample = tmp_path / "eicar.com"
    sample.write_bytes(SAMPLES["eicar.com"][0])
    agent = start_agent()
    agent.send(6053, {"exe": str(sample)}, token="file")
    agent.send(6053, {"exe": "relative/path"}, token="relative")
    agent.send(6053, {"exe": str(tmp_path / "missing")}, token="missing")
    agent.send(6053, "{not json", token="badjson")
    agent.send(6053, "[1, 2]", token="notobject")
    assert agent.done("file").fields["status"] == "succeed"
    (result,) = [r for r in by_type(agent.records, 6003) if r.fields["token"] == "file"]
    assert result.fields["exe"] == result.fields["static_file"] == str(sample)
    assert (result.fields["types"], result.fields["class"], result.fields["name"]) == ("Multios", "TestFile", "Eicar")
    assert result.fields["exe_size"] == str(len(SAMPLES["eicar.com"][0])) and result.fields["error"] == ""
    assert agent.done("relative").fields["status"] == "failed"
    assert agent.done("missing").fields == {"status": "failed", "msg": f"6053 target not exists:{tmp_path}/missing",
                                            "token": "missing"}
    for token in ("badjson", "notobject"):
        done = agent.done(token)
        assert done.fields["status"] == "failed" and "JSON" in done.fields["msg"]
    assert agent.close() == 0


def test_malformed_bytes_unknown_types_and_unsupported_controls_are_logged_not_fatal(start_agent):
    agent = start_agent()
    for body in (b"\x08", b"\x0b\x01", b"\x1a\x02\xff\xfe", b"\x1a\x09short"):
        agent.send_raw(struct.pack("<I", len(body)) + body)
    agent.send(7777, "", token="unknown")
    agent.send(6050, "{oops", token="badupdate")
    for data_type in (6051, 6052, 6054):
        agent.send(data_type)
    agent.send(6053, {"exe": "/etc/hostname"}, token="still-alive")
    assert agent.done("still-alive").fields["status"] == "succeed"
    logs = agent.wait_for(lambda rs: len([r for r in rs if r.data_type == 1010]) >= 9)
    messages = agent.logs()
    assert sum("malformed task" in m for m in messages) == 4
    assert any("truncated varint" in m for m in messages)
    assert any("not UTF-8" in m for m in messages)
    assert any("unknown data_type 7777" in m for m in messages)
    assert any("6050" in m and "not JSON" in m for m in messages)
    for data_type in (6051, 6052, 6054):
        assert any(f"task {data_type}" in m and "unsupported" in m and "fanotify" in m for m in messages)
    log = next(r for r in logs if r.data_type == 1010)
    assert set(log.fields) == {"level", "target", "file", "line", "msg"} and log.fields["level"] == "ERROR"
    assert not by_type(agent.records, 6000)[:-1]  # nothing answered but the good task
    assert agent.close() == 0


def test_a_frame_length_of_4_gib_is_reported_and_the_plugin_keeps_hearing_tasks(start_agent):
    """Audit F2: the reader took 0xFFFFFFFF for a 4 GiB frame and swallowed every later task, silently."""
    agent = start_agent()
    agent.send_raw(b"\xff\xff\xff\xff")
    agent.send(6053, {"exe": "/etc/hostname"}, token="after-bad-length")
    assert agent.done("after-bad-length", timeout=20).fields["status"] == "succeed"
    agent.wait_for(lambda rs: any(r.data_type == 1010 for r in rs))
    (message,) = [m for m in agent.logs() if "malformed task" in m]
    assert "4294967295 bytes is over the 16777216-byte limit" in message and "resynchronising" in message
    assert agent.close() == 0


def test_6057_quick_scan_processes_then_files_with_token_and_progress(start_agent, plugin_dir, tmp_path):
    roots = tmp_path / "roots"
    write_samples(roots / "a" / "b" / "c" / "d")  # no depth limit
    plugin_dir.configure(quick_roots=[str(roots)], progress="200ms")
    # a running process whose executable YARA flags: a copy of sleep with a miner config appended
    exe = tmp_path / "bin" / "miner-sleep"
    exe.parent.mkdir()
    exe.write_bytes(open(shutil.which("sleep"), "rb").read() + SAMPLES["miner.json"][0])
    exe.chmod(0o755)
    sleeper = subprocess.Popen([str(exe), "60"])
    try:
        agent = start_agent()
        agent.send(6057, {"mode": "quick", "cpu_idle": "80", "timeout": "1"}, token="tok-6057")
        done = agent.done("tok-6057", timeout=60)
    finally:
        sleeper.kill()
        sleeper.wait()
    assert done.fields == {"status": "succeed", "msg": "", "token": "tok-6057"}
    records = agent.records
    processes = [r for r in by_type(records, 6002) if r.fields["pid"] == str(sleeper.pid)]
    assert len(processes) == 1
    process = processes[0].fields
    assert FILE_SET | PROCESS_SET | {"token"} <= set(process)
    assert process["exe"] == str(exe) and process["token"] == "tok-6057"
    assert (process["comm"], process["ppid"], process["argv"]) == ("miner-sleep", str(os.getpid()), f"{exe} 60")
    assert (process["types"], process["class"]) == ("Linux", "Cryptominer")
    files = [r for r in by_type(records, 6001) if r.fields["static_file"].startswith(str(roots))]
    assert len(files) == DETECTED
    assert all(r.fields["token"] == "tok-6057" and FILE_SET <= set(r.fields) for r in files)
    assert records.index(processes[0]) < min(records.index(r) for r in files)  # processes first
    assert all(r.fields["types"] != "not_detected" for r in by_type(records, 6001) + by_type(records, 6002))
    progress = by_type(records, 6058)
    assert progress and progress[-1].fields["token"] == "tok-6057"
    assert int(progress[-1].fields["detected"]) >= len(files)
    assert records.index(done) > max(records.index(r) for r in files + progress)
    assert agent.close() == 0


def test_6057_timeout_ends_with_fullscan_timeout_and_other_tasks_are_not_kept_waiting(start_agent):
    agent = start_agent()
    agent.send(6057, {"mode": "full", "cpu_idle": "100", "timeout": "0.001"}, token="slow")  # 3.6 s
    agent.send(6057, {"mode": "quick"}, token="second")  # one disk scan at a time
    for i in range(5):  # answered while the full scan runs
        agent.send(6053, {"exe": "/etc/hostname"}, token=f"quick-{i}")
    done = agent.done("slow", timeout=30)
    assert done.fields == {"status": "failed", "msg": "FullScan TimeOut.", "token": "slow"}
    records = agent.records
    answers = [r for r in by_type(records, 6000) if r.fields["token"].startswith("quick-")]
    assert len(answers) == 5 and all(records.index(r) < records.index(done) for r in answers)
    second = agent.done("second")
    assert second.fields["msg"] == "a disk scan is already running" and records.index(second) < records.index(done)
    agent.send(6053, {"exe": "/etc/hostname"}, token="after")  # the plugin goes on
    assert agent.done("after").fields["status"] == "succeed"
    assert agent.close() == 0


def test_second_instance_is_refused_by_the_lock(start_agent):
    first = start_agent()
    first.send(6053, {"exe": "/etc/hostname"}, token="up")
    first.done("up")
    second = start_agent()
    assert second.process.wait(20) == 0
    assert "Clamav running duplicate, exit" in second.stderr()
    assert second.records == []
    assert first.close() == 0


def test_agent_closing_the_pipes_stops_the_plugin_within_10s(start_agent):
    agent = start_agent()
    agent.send(6057, {"mode": "full", "cpu_idle": "100"}, token="long")
    time.sleep(1)
    started = time.monotonic()
    assert agent.close(timeout=10) == 0
    assert time.monotonic() - started < 10


def test_a_write_to_a_closed_record_pipe_stops_the_plugin(start_agent):
    agent = start_agent(read_records=False)
    agent.send(7777)  # answered with a 1010 line, whose write fails with EPIPE
    assert agent.process.wait(10) == 0
    assert "sink 'elkeid' is closed (BrokenPipeError); stopping the session" in agent.log()
    os.close(agent.task_w)


def test_sigterm_exits_as_elkeid_does(start_agent, plugin_dir):
    agent = start_agent()
    agent.send(6053, {"exe": "/etc/hostname"}, token="up")
    agent.done("up")
    # The pid file names the process that runs elkscan, as Elkeid's does; the loaders in front of it
    # (the pid the agent started) pass SIGTERM and SIGINT on (docs/elkeid.md, section 1).
    plugin_pid = int((plugin_dir.tmp / "elkeid_scanners_plugin.pid").read_text())
    os.kill(plugin_pid, signal.SIGUSR1)  # ignored
    time.sleep(0.3)
    assert agent.process.poll() is None
    agent.process.send_signal(signal.SIGTERM)
    assert agent.process.wait(10) == 0
    log = (plugin_dir.workdir / "scanner.log").read_text()  # the log file, in the plugin directory
    assert "task 6053 received (token 'up')" in log and "signal 15: stopping" in log


def test_6053_can_be_kept_from_following_links_out_of_the_directory(start_agent, plugin_dir, tmp_path):
    plugin_dir.configure(task_links="inside")
    target = tmp_path / "web"
    target.mkdir()
    (target / "index.php").write_bytes(SAMPLES["webshell.php"][0])
    outside = tmp_path / "outside.php"
    outside.write_bytes(SAMPLES["webshell.php"][0])
    os.symlink(outside, target / "linked.php")
    os.symlink(target / "index.php", target / "alias.php")  # a link inside the directory still counts
    agent = start_agent()
    agent.send(6053, {"exe": str(target)}, token="tok-inside")
    assert agent.done("tok-inside").fields["status"] == "succeed"
    assert sorted(r.fields["static_file"] for r in by_type(agent.records, 6003)) == [
        str(target / "alias.php"), str(target / "index.php")]
    assert agent.close() == 0


def test_a_detection_in_a_file_whose_name_is_not_utf8_is_sent_not_dropped(start_agent, plugin_dir, tmp_path):
    """Audit F7: the name went through a strict UTF-8 encoder and the 6003/6001 vanished (a false clean).
    It goes out as Elkeid sends it, with U+FFFD for the bad byte."""
    target = tmp_path / "web"
    target.mkdir()
    eicar = SAMPLES["eicar.com"][0]
    with open(os.fsencode(target) + b"/mal\xff.com", "wb") as f:
        f.write(eicar)
    (target / "ok_eicar.com").write_bytes(eicar)
    plugin_dir.configure(quick_roots=[str(target)])
    agent = start_agent()
    agent.send(6053, {"exe": str(target)}, token="lossy")
    assert agent.done("lossy").fields["status"] == "succeed"
    results = {r.fields["static_file"]: r.fields["types"] for r in by_type(agent.records, 6003)}
    assert results == {f"{target}/mal\ufffd.com": "Multios", f"{target}/ok_eicar.com": "Multios"}
    agent.send(6057, {"mode": "quick", "cpu_idle": "100"}, token="lossy-6057")
    assert agent.done("lossy-6057", timeout=60).fields["status"] == "succeed"
    assert {r.fields["static_file"] for r in by_type(agent.records, 6001)} >= set(results)
    assert agent.close() == 0
    logs = agent.stderr() + (plugin_dir.workdir / "scanner.log").read_text(errors="replace")
    assert "UnicodeEncodeError" not in logs and "Logging error" not in logs


def test_6053_on_what_is_not_a_regular_file_fails_with_the_reason(start_agent, plugin_dir, tmp_path):
    """Audit F5: /dev/zero or a FIFO got a 6000 `succeed` with no 6003 (a task answered, nothing judged)."""
    import socket
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    listening = socket.socket(socket.AF_UNIX)
    listening.bind(str(tmp_path / "sock"))
    odd = os.fsencode(tmp_path) + b"/pipe\xff"  # its name in the log is not UTF-8 either
    os.mkfifo(odd)
    (tmp_path / "to-fifo").symlink_to(fifo)
    cases = {"zero": ("/dev/zero", "a character device"), "fifo": (str(fifo), "a FIFO"),
             "sock": (str(tmp_path / "sock"), "a socket"), "link": (str(tmp_path / "to-fifo"), "a FIFO"),
             "odd": (os.fsdecode(odd), "a FIFO")}
    agent = start_agent()
    try:
        for token, (path, _) in cases.items():
            agent.send(6053, json.dumps({"exe": path}, ensure_ascii=True), token=token)
        for token, (path, kind) in cases.items():
            shown = path.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
            done = agent.done(token).fields
            assert done["msg"] == f"6053 target not scanned:{shown}: it is {kind}, not a regular file"
            assert done["status"] == "failed"
        assert not by_type(agent.records, 6003)
        assert agent.close() == 0
    finally:
        listening.close()
    assert "pipe\\udcff not scanned" in (plugin_dir.workdir / "scanner.log").read_text()  # logged, escaped


def test_6053_on_a_regular_file_always_answers_with_its_6003(start_agent, tmp_path):
    """Elkeid answers a task's own file whatever its size; a file no engine reads says so in `error`."""
    tiny = tmp_path / "tiny"
    tiny.write_bytes(b"abc")  # under the 5-byte bound of directory entries
    sparse = tmp_path / "sparse.bin"
    with open(sparse, "wb") as f:
        f.truncate(30 << 20)  # over yara's 25 MiB max_file_size
    agent = start_agent()
    agent.send(6053, {"exe": str(tiny)}, token="tiny")
    agent.send(6053, {"exe": str(sparse)}, token="sparse")
    for token in ("tiny", "sparse"):
        assert agent.done(token).fields["status"] == "succeed"
    results = {r.fields["token"]: r.fields for r in by_type(agent.records, 6003)}
    tiny_result = results["tiny"]
    assert (tiny_result["types"], tiny_result["error"], tiny_result["exe_size"]) == ("not_detected", "", "3")
    assert results["sparse"]["error"] == "not scanned: above yara's max_file_size"
    assert agent.close() == 0


def test_6053_and_6057_over_a_symlink_loop_still_end_with_their_6000(start_agent, plugin_dir, tmp_path):
    """Audit F8/F9 as the audit performed it: a loop beside two EICARs, and a second root after it."""
    loop = tmp_path / "loopdir"
    loop.mkdir()
    os.symlink("l2", loop / "l1")
    os.symlink("l1", loop / "l2")
    (loop / "a_eicar.com").write_bytes(SAMPLES["eicar.com"][0])
    (loop / "z_eicar.com").write_bytes(SAMPLES["eicar.com"][0])
    mixed = tmp_path / "mixed"
    write_samples(mixed)
    plugin_dir.configure(quick_roots=[str(loop), str(mixed)])
    agent = start_agent()
    agent.send(6053, {"exe": str(loop)}, token="loop-6053")
    agent.send(6057, {"mode": "quick", "cpu_idle": "100", "timeout": "0.01"}, token="loop-6057")
    for token in ("loop-6053", "loop-6057"):
        done = agent.done(token, timeout=60)
        # whatever the walk makes of the loop, the task ends, and a failure says why in a 1010 too
        assert done.fields["status"] == "succeed" or any(done.fields["msg"] in m for m in agent.logs())
    hits = {r.fields["static_file"] for r in by_type(agent.records, 6001)}
    assert {str(mixed / name) for name, (_, rule) in SAMPLES.items() if rule} <= hits
    assert agent.close() == 0

"""Fleet hash verification, the verifier's half: record documents other hosts sent become digest targets
(``elkscan_core.fleet.digest_target``), judged by the engines that judge digests, never opened here."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import attrs
import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from elkscan_core import Detection, Engine, Record, Source, Target, hookimpl
from elkscan_core.cache import dates_mmap_writes
from elkscan_core.ecs import ecs_document
from elkscan_core.fleet import MAX_DOCUMENT, digest_target
from elkscan_core.model import Receipt, record_id
from elkscan_core.render import json_line, record_fields
from elkscan_core.text import escaped_bytes, unescaped_bytes
from elkscan_core.testing import run

HOST, VERIFIER = "web-1", "verifier-1"


class Documents(Source):
    """Record documents as a fleet source hands them over: each one a digest target; one that is not a
    record, not scanned as ``malformed record`` (what the nats and kafka sources do)."""

    id = "documents"
    queue: list[bytes] = []
    settled: list[str] = []

    def targets(self):
        for number, document in enumerate(self.queue):
            receipt = Receipt(lambda n=number: self.settled.append(f"ack {n}"),
                              lambda n=number: self.settled.append(f"nak {n}"))
            try:
                yield digest_target(document, self.id, receipt)
            except ValueError:
                yield Target(path=f"document {number}", origin=self.id, skip="malformed record", receipt=receipt)


class Stuck(Engine):
    """An engine that judges digests and hangs on one, raises on another: the session's isolation holds."""

    id = "stuck"
    judges_digests = True
    call_timeout = 0.5

    def judge_digests(self, digests, size):
        if size == 1:
            time.sleep(30)
        if size == 2:
            raise RuntimeError("the hash service is down")
        return [Detection.from_signature(self.id, "Unix.Test.Stuck-1")] if size == 3 else []

    def scan(self, subject):
        raise AssertionError("a digest target was opened")


class DocumentsPlugin:
    @hookimpl
    def elkscan_register_sources(self, registry):
        registry.add(Documents)

    @hookimpl
    def elkscan_register_engines(self, registry):
        registry.add(Stuck)


def verify(documents, engines, tmp_path, **options):
    """A verifier session over ``documents``: its records (all, clean ones too) and its file sink's lines."""
    Documents.queue, Documents.settled = list(documents), []
    log = tmp_path / "verified.jsonl"
    result = run({"plugins": ["hash_extractor", "yara_backend", "proc_enricher", "file_sink"], "host": VERIFIER,
                  "state_dir": str(tmp_path / "verifier-state"), "sources": ["documents"], "engines": engines,
                  "sinks": [{"use": "file", "with": {"path": str(log)}}], **options},
                 extra_plugins=[DocumentsPlugin()], report_clean=True)
    lines = [json.loads(line) for line in log.read_bytes().splitlines()] if log.exists() else []
    return result, lines


@pytest.fixture(scope="module")
def host_side(tmp_path_factory):
    """What a scanning host sends: a real session (procscan with process facts, dirscan, yara, the hashes
    enricher with ``when: all``) writing every record to a file sink, as a fleet host's delivery sink does.
    Returns the documents as written, by path, and the running "malware" (a copy of sleep)."""
    base = tmp_path_factory.mktemp("host")
    tree = base / "tree"
    tree.mkdir()
    evil = tree / "evil-sleep"
    evil.write_bytes(open("/bin/sleep", "rb").read())
    evil.chmod(0o755)
    (tree / "notes.txt").write_bytes(b"nothing to see\n")
    (tree / "odd-\xff\xfe.bin".encode("latin-1").decode("utf-8", "surrogateescape")).write_bytes(b"odd name\n")
    process = subprocess.Popen([str(evil), "300"])
    try:
        log = base / "host.jsonl"
        run({"plugins": ["hash_extractor", "yara_backend", "proc_enricher", "file_sink"], "host": HOST,
             "state_dir": str(base / "host-state"),
             "sources": [{"use": "procscan", "with": {"exclude": []}},
                         {"use": "dirscan", "with": {"roots": {str(tree): -1}, "exclude": [], "type_filter": False}}],
             "engines": ["yara"],
             "enrichers": [{"use": "process", "with": {"when": "all"}},
                           {"use": "hashes", "with": {"when": "all", "sha256": True}}],
             "sinks": [{"use": "file", "with": {"path": str(log)}}]}, report_clean=True)
        documents = {}  # path (as shown, lossy) -> the line
        for line in log.read_bytes().splitlines():
            fields = json.loads(line)
            # the running file is found by both sources, in either order: its process's record is kept
            if fields.get("pid") == process.pid or (fields.get("origin") == "dirscan" and fields["path"] not in documents):
                documents[fields["path"]] = line
        yield documents, evil, process.pid
    finally:
        process.kill()
        process.wait()


@pytest.fixture(scope="module")
def full_set(host_side, tmp_path_factory):
    """The verifier's full hash set, compiled with the real CLI (``elkscan db hashes``): the evil file's
    MD5 with its size, and nothing else the host has."""
    _, evil, _ = host_side
    base = tmp_path_factory.mktemp("lists")
    content = evil.read_bytes()
    (base / "full.hdb").write_text(f"{hashlib.md5(content).hexdigest()}:{len(content)}:Unix.Trojan.FleetOnly-1\n"
                                   f"{'0' * 32}:5:Unix.Trojan.Other-2\n")
    index = base / "full.idx"
    subprocess.run([sys.executable, "-m", "elkscan_core.cli", "db", "hashes", str(base / "full.hdb"), "-o",
                    str(index)], check=True, capture_output=True)
    return index


def document_of(host_side, path):
    documents, _, _ = host_side
    return documents[str(path)]


def test_a_digest_in_the_full_set_is_detected_with_the_hosts_host_path_process_and_record_id(
        host_side, full_set, tmp_path):
    documents, evil, pid = host_side
    sent = json.loads(document_of(host_side, evil))
    assert sent["host"] == HOST and sent["status"] == "clean" and sent["pid"] == pid  # yara found nothing there
    result, lines = verify([document_of(host_side, evil)], ["yara", {"use": "hashlist", "with": {"files": [str(full_set)]}}],
                           tmp_path, enrichers=[{"use": "hashes", "with": {"when": "all"}},
                                                {"use": "process", "with": {"when": "all"}}])
    (record,) = result.records
    assert record.status == "detected" and record.judged_by == ("hashlist",)  # yara does not apply
    assert record.target.host == HOST and record.target.path == str(evil) and record.target.origin == "documents"
    (detection,) = record.detections
    assert detection.signature == "Unix.Trojan.FleetOnly-1"
    assert detection.meta == {"algorithm": "md5", "list": str(full_set)}
    assert record.facts["pid"] == pid and record.facts["comm"] == "evil-sleep" and record.facts["host_record_id"] == sent["id"]
    versions = {"hashlist": result.session.find("engine", "hashlist").version()}
    here = attrs.evolve(record, target=attrs.evolve(record.target, host=""))  # the same, were the file here
    assert record.id == record_id(record, VERIFIER, versions) == record_id(here, HOST, versions) != \
        record_id(here, VERIFIER, versions)
    (line,) = lines
    assert line["host"] == HOST and line["verifier"] == VERIFIER and line["host_record_id"] == sent["id"]
    assert line["path"] == str(evil) and line["status"] == "detected" and line["judged_by"] == ["hashlist"]
    assert line["pid"] == pid and line["argv"] == sent["argv"] and line["md5_hash"] == sent["md5_hash"]
    assert line["exe_size"] == sent["exe_size"] and line["id"] == record.id != sent["id"]
    assert result.summary.files == 1 and result.summary.detected_files == 1 and result.summary.bytes == 0
    assert Documents.settled == ["ack 0"]  # once the file sink and the collector had the record
    assert record.errors == () and record.facts["exe_hash"] == sent["exe_hash"]  # enrichers left it alone


def test_digests_not_listed_are_clean_judged_by_hashlist_alone(host_side, full_set, tmp_path):
    documents, evil, _ = host_side
    others = [line for path, line in documents.items() if path != str(evil)]
    result, lines = verify(others, ["yara", {"use": "hashlist", "with": {"files": [str(full_set)]}}], tmp_path)
    assert len(result.records) == len(others) == 2
    for record in result.records:
        assert record.status == "clean" and record.judged_by == ("hashlist",) and record.target.host == HOST
    odd = next(line for line in lines if "path_bytes" in line)  # a name that is not UTF-8 comes back exact
    assert odd["path_bytes"].endswith("odd-\\xff\\xfe.bin") and odd["host"] == HOST
    assert result.summary.clean == 2 and result.summary.errors == 0


def test_without_an_engine_that_judges_digests_nothing_is_judged(host_side, tmp_path):
    documents, _, _ = host_side
    result, lines = verify(list(documents.values()), ["yara"], tmp_path)
    assert {r.status for r in result.records} == {"not_scanned"}
    assert {r.skipped for r in result.records} == {"no engine judges digests"}
    assert all(r.judged_by == () for r in result.records)
    assert result.summary.not_scanned == {"no engine judges digests": 3} and result.summary.clean == 0
    assert {line["reason"] for line in lines} == {"no engine judges digests"}


def test_judging_digests_is_isolated_as_scanning_is(tmp_path):
    def document(size):
        return json.dumps({"host": HOST, "path": f"/srv/{size}", "md5_hash": "a" * 32, "exe_size": size}).encode()

    started = time.monotonic()
    result, _ = verify([document(size) for size in (1, 2, 3, 4)], ["stuck"], tmp_path)
    assert time.monotonic() - started < 20  # the hanging call was given up, not waited for
    outcome = {r.target.path: (r.status, [o.status for o in r.errors]) for r in result.records}
    assert outcome == {"/srv/1": ("error", ["timeout"]), "/srv/2": ("error", ["failed"]),
                       "/srv/3": ("detected", []), "/srv/4": ("clean", [])}


class Opened(Source):
    """A careless source: digest targets that come with an open descriptor of a local file."""

    id = "opened"
    paths: list[str] = []

    def targets(self):
        for path in self.paths:
            yield Target(path=path, fd=os.open(path, os.O_RDONLY), digests={"md5": "a" * 32}, size=1)


class OpenedPlugin:
    @hookimpl
    def elkscan_register_sources(self, registry):
        registry.add(Opened)


def test_a_digest_target_is_never_read_nor_answered_by_the_verdict_cache(tmp_path):
    """Even with a descriptor of a local file the verdict cache holds clean, a digest target is judged by
    its digests alone: with only yara, not scanned; the descriptor is closed."""
    fd = os.open(tmp_path, os.O_RDONLY)
    try:
        base = tmp_path if dates_mmap_writes(fd) else Path(tempfile.mkdtemp(dir=Path(__file__).resolve().parent))
    finally:
        os.close(fd)
    try:
        (base / "local.txt").write_bytes(b"a clean local file\n")
        time.sleep(1.2)  # the cache keeps no verdict on a file changed within its settle time
        pipeline = {"plugins": ["yara_backend"], "engines": ["yara"], "state_dir": str(tmp_path / "state"),
                    "limits": {"cache": True, "cache_path": str(tmp_path / "verdicts.sqlite")}}
        run({**pipeline, "sources": [{"use": "dirscan", "with": {"roots": {str(base): -1}}}]})
        Opened.paths = [str(base / "local.txt")]
        before = len(os.listdir("/proc/self/fd"))
        result = run({**pipeline, "sources": ["opened"]}, extra_plugins=[OpenedPlugin()])
        assert result.summary.not_scanned == {"no engine judges digests": 1}  # not silently clean
        assert result.summary.cached == result.summary.clean == 0
        assert len(os.listdir("/proc/self/fd")) <= before
    finally:
        if base != tmp_path:
            shutil.rmtree(base)


def test_the_size_is_part_of_a_signature_and_a_star_matches_any(host_side, tmp_path):
    _, evil, _ = host_side
    sent = json.loads(document_of(host_side, evil))
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "sized.hdb").write_text(f"{sent['md5_hash']}:{sent['exe_size']}:Unix.Trojan.Sized-1\n")
    (lists / "any.hashes").write_text(f"sha256:{sent['sha256']}:*:Unix.Trojan.AnySize-2\n")
    other_size = json.dumps({**sent, "exe_size": sent["exe_size"] + 1}).encode()
    result, _ = verify([other_size], [{"use": "hashlist", "with": {"files": [str(lists / "sized.hdb")]}}], tmp_path)
    assert result.records[0].status == "clean"
    result, _ = verify([other_size], [{"use": "hashlist", "with": {"files": [str(lists / "*")]}}], tmp_path)
    (detection,) = result.records[0].detections
    assert detection.signature == "Unix.Trojan.AnySize-2"
    assert detection.meta == {"algorithm": "sha256", "list": str(lists / "any.hashes")}


def test_a_document_with_only_a_sha256_or_a_sha1(host_side, tmp_path):
    _, evil, _ = host_side
    sent = json.loads(document_of(host_side, evil))
    sha1 = hashlib.sha1(evil.read_bytes()).hexdigest()
    (tmp_path / "full.hsb").write_text(f"{sent['sha256']}:{sent['exe_size']}:Unix.Trojan.Sha256-3\n"
                                       f"{sha1}:*:Unix.Trojan.Sha1-4\n")
    only_sha256 = {k: v for k, v in sent.items() if k != "md5_hash"}
    only_sha1 = {**{k: v for k, v in sent.items() if k not in ("md5_hash", "sha256")}, "sha1": sha1.upper()}
    result, lines = verify([json.dumps(only_sha256).encode(), json.dumps(only_sha1).encode()],
                           [{"use": "hashlist", "with": {"files": [str(tmp_path / "full.hsb")]}}], tmp_path)
    assert [r.detections[0].signature for r in result.records] == ["Unix.Trojan.Sha256-3", "Unix.Trojan.Sha1-4"]
    assert result.records[1].target.digests == {"sha1": sha1}  # lowercase, whatever the host sent
    assert "md5_hash" not in lines[0] and lines[1]["sha1"] == sha1.upper()  # the host's facts as they came


def test_malformed_documents_and_documents_without_digests(host_side, tmp_path):
    documents, evil, _ = host_side
    sent = json.loads(document_of(host_side, evil))
    event = {"kind": "file_event", "time": 1.0, "id": "ab" * 16, "host": HOST, "file_path": "/tmp/x"}
    (tmp_path / "none.hashes").write_text(f"md5:{'1' * 32}:1:Unix.Test.None-1\n")
    result, _ = verify([b"\xff\xfe", b"[1, 2]", b"{", json.dumps({**sent, "md5_hash": 5}).encode(),
                        json.dumps(event).encode()],
                       ["yara", {"use": "hashlist", "with": {"files": [str(tmp_path / "none.hashes")]}}], tmp_path)
    assert result.summary.not_scanned == {"malformed record": 4, "no digests": 1}
    assert sorted(Documents.settled) == [f"ack {n}" for n in range(5)]  # a poison message never comes back
    assert result.summary.files == 0 and result.summary.errors == 0


@pytest.mark.parametrize("document, reason", [
    (b"\xff", "not UTF-8 (byte 0xff at offset 0)"),
    (b"", "not JSON: Expecting value at offset 0"),
    (b"NaN", "not JSON: NaN is not a number JSON has"),
    (b"[]", "not a record: a JSON list, expected an object"),
    (b"[" * 100000, "not a record: nested too deeply"),
    (b'{"a":' * 40 + b"1" + b"}" * 40, "not a record: nested more than 32 deep"),
    (b" " * (MAX_DOCUMENT + 1), f"{MAX_DOCUMENT + 1} bytes, over the {MAX_DOCUMENT} a record may take"),
    (b'{"md5_hash": "abc", "host": "h", "path": "/p"}', 'md5_hash is not 32 hex digits: "abc"'),
    (b'{"sha256": 7}', "sha256 is not 64 hex digits: 7"),
    (b'{"md5_hash": "%s", "path": "/p"}' % (b"a" * 32), "the record names no host: a file without its host cannot be reported"),
    (b'{"md5_hash": "%s", "host": "h"}' % (b"a" * 32), "the record names no path"),
    (b'{"host": "a b"}', 'host is not a name: "a b"'),
    (b'{"host": "h\\u202e"}', 'host is not a name: "h\\u202e"'),
    (b'{"path": ["x"]}', 'path is not a string: ["x"]'),
    (b'{"path": "/a\\u0000b"}', "path holds a NUL byte"),
    (b'{"path": "/a\\udcff"}', "path is not valid Unicode (a name that is not UTF-8 comes as path_bytes)"),
    (b'{"exe_size": -1}', "exe_size is not a size in bytes: -1"),
    (b'{"exe_size": true}', "exe_size is not a size in bytes: true"),
    (b'{"exe_size": 1.5}', "exe_size is not a size in bytes: 1.5"),
    (b'{"path": "x", "path_bytes": "\\\\u12"}', '"path_bytes" is not an escaped name'),
    (b'{"path": "x", "path_bytes": 3}', '"path_bytes" is not a string'),
])
def test_what_is_not_a_record_is_refused_with_a_one_line_reason(document, reason):
    with pytest.raises(ValueError) as raised:
        digest_target(document, "nats")
    assert str(raised.value) == reason and "\n" not in reason


def test_a_record_becomes_a_digest_target():
    document = {"kind": "finding", "time": 1.5, "id": "c" * 32, "host": HOST, "origin": "procscan",
                "path": "/usr/bin/x", "exe": "/usr/bin/x", "static_file": "/usr/bin/x", "status": "clean",
                "judged_by": ["yara"], "types": "not_detected", "class": "", "name": "", "exe_size": 10,
                "exe_hash": "e" * 16, "md5_hash": "A" * 32, "sha256": "b" * 64, "create_at": 1, "modify_at": 2,
                "pid": 7, "argv": "x --serve", "verifier": "forged", "host_record_id": "forged"}
    target = digest_target(json.dumps(document).encode(), "kafka")
    assert (target.path, target.host, target.size, target.origin, target.kind) == (
        "/usr/bin/x", HOST, 10, "kafka", "finding")
    assert target.digests == {"md5": "a" * 32, "sha256": "b" * 64} and not target.has_content and not target.skip
    assert target.extra == {"exe_size": 10, "exe_hash": "e" * 16, "md5_hash": "A" * 32, "sha256": "b" * 64,
                            "create_at": 1, "modify_at": 2, "pid": 7, "argv": "x --serve",
                            "host_record_id": "c" * 32}
    judged = Record(kind="finding", target=target, facts=target.extra, judged_by=["hashlist"], id="d" * 32)
    doc = ecs_document(record_fields(judged, VERIFIER), VERIFIER)
    assert doc["host"] == {"name": HOST} and doc["observer"] == {"hostname": VERIFIER}
    assert doc["file"]["hash"]["md5"] == "A" * 32 and doc["elkscan"]["host_record_id"] == "c" * 32
    here = ecs_document(record_fields(attrs.evolve(judged, target=Target("/usr/bin/x")), VERIFIER), VERIFIER)
    assert here["host"] == {"name": VERIFIER} and "observer" not in here
    from elkscan_stdout_sink.table import Table

    assert "web-1:/usr/bin/x" in "".join(Table(None).rows(judged))  # never shown as a path of this host
    event = digest_target(b'{"kind": "ransom_status", "host": "h", "status": "on"}', "nats")
    assert event.skip == "no digests" and event.host == "h" and event.digests == {}


def test_the_pipelines_host_names_records_and_a_bad_one_is_refused(tmp_path):
    from elkscan_core import ConfigError

    (tmp_path / "a.txt").write_text("x")
    result = run({"host": "scanner-7.example.org", "sources": [{"use": "dirscan", "with": {"roots": {str(tmp_path): -1}}}],
                  "plugins": ["yara_backend"], "engines": ["yara"]}, report_clean=True)
    assert result.session.host == "scanner-7.example.org"
    assert result.records[0].id == record_id(result.records[0], "scanner-7.example.org", {})
    for bad in ("", "two words", "a/b", "-lead", "x" * 64, 7, "a..b", "ünï"):
        with pytest.raises(ConfigError, match="host"):
            run({"host": bad, "sources": []})


# -- fuzz: documents from the network --------------------------------------------------------------------

def check(document: bytes) -> None:
    """Only ValueError for what is not a record; a target that renders, and reads back the same, else."""
    try:
        target = digest_target(document, "fuzz")
    except ValueError as exc:
        assert str(exc) and "\n" not in str(exc)
        event("refused")
        return
    event("a digest target" if target.digests else "a target without digests")
    assert all(len(v) == {"md5": 32, "sha1": 40, "sha256": 64}[k] and v == v.lower() for k, v in target.digests.items())
    assert bool(target.skip) == (not target.digests) and not (target.digests and target.has_content)
    fields = record_fields(Record(kind=target.kind, target=target, facts=target.extra, judged_by=["hashlist"],
                                  id="f" * 32, skipped=target.skip), VERIFIER)
    line = json_line(fields).encode()
    if not target.digests:
        return
    again = digest_target(line, "fuzz")  # what a verifier writes is a record another can read
    assert (again.path, again.host, again.digests, again.size) == (target.path, target.host, target.digests, target.size)
    assert fields["host"] == target.host and fields["verifier"] == VERIFIER


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                           max_leaves=20)
FIELDS = ["kind", "time", "id", "host", "verifier", "origin", "path", "path_bytes", "exe", "status", "md5_hash",
          "sha1", "sha256", "exe_size", "pid", "comm", "comm_bytes", "host_record_id", "detections"]
hexes = st.sampled_from([32, 40, 64, 31]).flatmap(lambda n: st.text("0123456789abcdefABCDEF", min_size=n, max_size=n))
field_values = json_values | hexes | st.integers(-2, 1 << 65) | st.text(max_size=30)


@settings(max_examples=3000, deadline=None)
@given(st.binary(max_size=600))
@example(b'{"md5_hash": "' + b"0" * 32 + b'", "host": "h", "path": "/\\udcff"}')
def test_fuzz_arbitrary_bytes(document):
    check(document)


@settings(max_examples=3000, deadline=None)
@given(st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=10), field_values, max_size=12),
       st.fixed_dictionaries({"host": st.sampled_from(["web-1", "h"]) | st.text(max_size=10),
                              "path": st.text(max_size=20), "md5_hash": hexes}) | st.just({}))
def test_fuzz_arbitrary_json_objects(fields, digested):
    record = {**digested, **fields}
    check(json.dumps(record).encode())
    check(json.dumps(record, ensure_ascii=False).encode("utf-8", "surrogatepass"))


@settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzz_mutated_real_documents(host_side, data):
    documents, _, _ = host_side
    document = json.loads(data.draw(st.sampled_from(sorted(documents.values()))))
    for _ in range(data.draw(st.integers(1, 4))):
        key = data.draw(st.sampled_from(sorted(document) + FIELDS))
        action = data.draw(st.sampled_from(["drop", "set", "bytes"]))
        if action == "drop":
            document.pop(key, None)
        elif action == "set":
            document[key] = data.draw(field_values)
    raw = json.dumps(document).encode()
    if data.draw(st.booleans()):  # and the bytes themselves: cut, flipped, spliced
        at = data.draw(st.integers(0, len(raw)))
        raw = raw[:at] + data.draw(st.binary(max_size=8)) + raw[at + data.draw(st.integers(0, 8)):]
    check(raw)


@settings(max_examples=2000, deadline=None)
@given(st.binary(max_size=64))
def test_an_escaped_name_reads_back_to_its_exact_bytes(raw):
    assert unescaped_bytes(escaped_bytes(raw)) == raw


@settings(max_examples=2000, deadline=None)
@given(st.text(alphabet=st.sampled_from("ab\\x0fF9\udcff\u00e9"), max_size=24))
def test_an_escaped_name_from_elsewhere_is_read_exactly_or_refused(text):
    try:
        raw = unescaped_bytes(text)
    except ValueError:
        return
    assert unescaped_bytes(escaped_bytes(raw)) == raw  # what was accepted names one exact name

"""The ``http`` sink against a real HTTP server on 127.0.0.1 (and an HTTPS one with a CA made by openssl):
scans' records as JSON lines and arrays, Elasticsearch ``_bulk`` and Splunk HEC exactly, headers from the
environment never logged, TLS verified, an outage in the middle of a scan, refusals counted, a hung
endpoint bounded, Retry-After kept, redirects not followed."""

from __future__ import annotations

import json
import os
import socket
import threading
import time

import pytest

from elkscan_core import ConfigError
from elkscan_core.cli import main
from elkscan_core.testing import eicar, events, feed, run

BULK_FILTER = "filter_path=errors,items.*._id,items.*.status,items.*.error.type,items.*.error.reason"


def http(url, **options):
    return {"use": "http", "with": {"url": url, "flush_interval": "50ms", "timeout": "2s",
                                    "retry": {"initial": "20ms", "max": "200ms"}, **options}}


def scan(tmp_path, tree, sink, report_clean=False, **top):
    return run({"plugins": ["http_sink", "yara_backend"], "engines": ["yara"], "state_dir": str(tmp_path / "state"),
                "sources": [{"use": "dirscan", "with": {"roots": {str(tree): -1}, "type_filter": False}}],
                "sinks": [sink], **top}, report_clean=report_clean)


def tree_of(tmp_path, detected=2, clean=1):
    tree = tmp_path / "tree"
    tree.mkdir(exist_ok=True)
    for n in range(detected):
        (tree / f"eicar{n}.com").write_bytes(eicar())
    for n in range(clean):
        (tree / f"clean{n}.txt").write_bytes(b"nothing to see\n")
    return tree


def test_a_scans_records_as_json_lines(tmp_path, endpoint):
    """Every record arrives as a JSON line; how many requests carry them depends on how long the scan
    takes against flush_interval (two on a busy host), so that is not asserted."""
    result = scan(tmp_path, tree_of(tmp_path), http(endpoint.url + "/ingest"), report_clean=True)
    assert endpoint.requests
    for request in endpoint.requests:
        assert request.path == "/ingest" and request.headers["content-type"] == "application/x-ndjson"
        assert request.headers["user-agent"].startswith("elkscan-http-sink/")
        assert request.body.endswith(b"\n")
    docs = endpoint.records()  # each line of each body one JSON document
    assert sorted(d["id"] for d in docs) == sorted(r.id for r in result.records)
    assert sorted(d["status"] for d in docs) == ["clean", "detected", "detected"]
    assert all(d["host"] == result.session.host for d in docs)
    sink = result.session.find("sink", "http")
    assert sink.stats()["delivered"] == 3 and sink.stats()["depth"] == 0 and result.summary.errors == 0


def test_a_json_array_in_ecs(tmp_path, endpoint):
    scan(tmp_path, tree_of(tmp_path), http(endpoint.url, body="array", format="ecs"))
    docs = []
    for request in endpoint.requests:  # one, or more when the scan outlasts flush_interval
        assert request.path == "/" and request.headers["content-type"] == "application/json"
        assert isinstance(json.loads(request.body), list)
        docs += json.loads(request.body)
    assert [d["rule"]["name"] for d in docs] == ["Multios_TestFile_Eicar"] * 2


def test_elasticsearch_bulk_exactly(tmp_path, endpoint):
    result = scan(tmp_path, tree_of(tmp_path), http(endpoint.url, preset="elasticsearch", format="ecs",
                                                     index="logs-elkscan-default"))
    actions = []
    for request in endpoint.requests:  # one, or more when the scan outlasts flush_interval
        assert request.path == f"/_bulk?{BULK_FILTER}"
        assert request.headers["content-type"] == "application/x-ndjson"
        lines = request.body.split(b"\n")
        assert lines[-1] == b"" and len(lines) % 2 == 1  # action, document, ..., and the final newline
        assert lines[0].startswith(b'{"create":{"_index":"logs-elkscan-default","_id":"')
        for action, doc in zip(lines[0::2], lines[1::2]):
            action = json.loads(action)
            assert action == {"create": {"_index": "logs-elkscan-default", "_id": action["create"]["_id"]}}
            assert json.loads(doc)["event"]["id"] == action["create"]["_id"]  # the document, as ECS
            assert json.loads(doc)["@timestamp"]
            actions.append(action)
    assert sorted(a["create"]["_id"] for a in actions) == sorted(r.id for r in result.records)


def test_elasticsearch_index_by_default_and_from_the_url(tmp_path, endpoint):
    scan(tmp_path, tree_of(tmp_path, 1, 0), http(endpoint.url, preset="elasticsearch"))
    scan(tmp_path, tree_of(tmp_path, 1, 0), http(endpoint.url + "/mine/_bulk?pipeline=p", preset="elasticsearch"))
    first, second = endpoint.requests
    assert json.loads(first.body.split(b"\n")[0])["create"]["_index"] == "elkscan"
    assert second.path == f"/mine/_bulk?pipeline=p&{BULK_FILTER}"
    assert "_index" not in json.loads(second.body.split(b"\n")[0])["create"]


def test_elasticsearch_judges_each_record(tmp_path, endpoint):
    """A 200 with ``errors: true``: the record refused for good (400) is dropped and counted, the ones
    that failed for now (429, 503) are sent again alone, and the batch is delivered only once they are."""
    def answer(request):
        actions = [json.loads(line) for line in request.body.split(b"\n")[0::2] if line]
        if len(endpoint.requests) == 0:  # the first attempt: one of each
            statuses = [201, 400, 429, 503, 409]
        elif len(endpoint.requests) == 1:  # the second: still busy for one of them
            statuses = [201, 429]
        else:
            statuses = [201] * len(actions)
            GATE.set()
        assert len(statuses) == len(actions)
        items = [{"create": {"_id": a["create"]["_id"], "status": s, **(
            {"error": {"type": "mapper_parsing_exception" if s == 400 else "es_rejected_execution_exception",
                       "reason": "failed to parse field [file.size]\x1b[31m"}} if s in (400, 429, 503) else {})}}
            for a, s in zip(actions, statuses)]
        return 200, {}, json.dumps({"took": 3, "errors": True, "items": items}).encode()

    endpoint.answer = answer
    result = gated(tmp_path, http(endpoint.url, preset="elasticsearch", batch=10, flush_interval="300ms"), 5)
    sent = [[json.loads(line)["create"]["_id"] for line in r.body.split(b"\n")[0::2] if line]
            for r in endpoint.requests]
    assert len(sent) == 4 and len(sent[0]) == 5
    assert sent[1] == [sent[0][2], sent[0][3]] and sent[2] == [sent[0][3]]  # only what failed for now
    sink = result.session.find("sink", "http")
    stats = sink.stats()
    assert stats["rejected"] == 1 and stats["delivered"] == 4 + 10 and stats["depth"] == 0
    assert stats["failed_attempts"] == 2
    assert result.summary.errors == 1  # the refused record is an error of the run
    assert result.session.failures["http", "rejected"] == 1


def test_splunk_hec(tmp_path, endpoint, monkeypatch):
    monkeypatch.setenv("HEC_TOKEN", "11111111-2222-3333-4444-555555555555")
    result = scan(tmp_path, tree_of(tmp_path), http(endpoint.url, preset="splunk", token={"$env": "HEC_TOKEN"},
                                                     sourcetype="elkscan:record", index="security"))
    events = []
    for request in endpoint.requests:  # one, or more when the scan outlasts flush_interval
        assert request.path == "/services/collector/event"
        assert request.headers["authorization"] == "Splunk 11111111-2222-3333-4444-555555555555"
        assert request.headers["content-type"] == "application/json"
        assert request.body.startswith(b'{"time": ')
        events += endpoint.hec_events(request.body)  # one object after the other
    by_id = {r.id: r for r in result.records}
    assert sorted(e["event"]["id"] for e in events) == sorted(by_id)
    for event in events:
        record = by_id[event["event"]["id"]]
        assert set(event) == {"time", "host", "source", "sourcetype", "index", "event"}
        assert event["time"] == pytest.approx(record.timestamp, abs=0.001)
        assert (event["host"], event["source"], event["sourcetype"], event["index"]) == (
            result.session.host, "elkscan", "elkscan:record", "security")


def test_headers_from_the_environment_and_never_logged(tmp_path, endpoint, monkeypatch, caplog):
    secret = "s3cr3t-t0ken-never-logged"
    monkeypatch.setenv("SIEM_KEY", secret)
    answers = iter([(503, {}, b"busy"), (401, {}, b"bad key")])
    endpoint.answer = lambda request: next(answers, None) or opened()
    result = gated(tmp_path, http(endpoint.url, headers={"X-Api-Key": {"$env": "SIEM_KEY"}, "X-Team": "blue"}), 1)
    assert {r.headers["x-api-key"] for r in endpoint.requests} == {secret} and len(endpoint.requests) >= 4
    assert endpoint.requests[0].headers["x-team"] == "blue"
    sink = result.session.find("sink", "http")
    assert sink.stats()["delivered"] == 11 and sink.stats()["failed_attempts"] == 2  # 401: kept and retried
    assert "HTTP 503: busy" in caplog.text
    assert secret not in caplog.text and secret not in repr(sink.config)


def test_a_missing_environment_variable_is_named_at_start(tmp_path, endpoint, monkeypatch):
    monkeypatch.delenv("NO_SUCH_SIEM_KEY", raising=False)
    with pytest.raises(ConfigError, match="environment variable 'NO_SUCH_SIEM_KEY' is not set"):
        scan(tmp_path, tree_of(tmp_path), http(endpoint.url, headers={"X-Api-Key": {"$env": "NO_SUCH_SIEM_KEY"}}))


def test_tls_verified_against_ca_file_and_refused_without_it(tmp_path, tls_endpoint, authority, caplog):
    tree = tree_of(tmp_path, 1, 0)
    refused = scan(tmp_path, tree, http(tls_endpoint.url, timeout="500ms"))  # the system's CAs do not know ours
    assert tls_endpoint.requests == [] and "CERTIFICATE_VERIFY_FAILED" in caplog.text
    assert refused.session.find("sink", "http").stats()["depth"] == 1  # kept for when it is trusted
    (tmp_path / "empty").mkdir()
    delivered = scan(tmp_path, tmp_path / "empty", http(tls_endpoint.url, ca_file=authority.ca_file))
    assert tls_endpoint.ids() == [refused.records[0].id]  # what waited, over verified TLS
    assert delivered.session.find("sink", "http").stats()["depth"] == 0


def test_tls_verify_false_is_warned_about_once(tmp_path, tls_endpoint, caplog):
    scan(tmp_path, tree_of(tmp_path, 3, 0), http(tls_endpoint.url, tls_verify=False, batch=1))
    assert len(tls_endpoint.requests) == 3
    assert caplog.text.count("tls_verify: false") == 1


def test_a_ca_file_others_can_write_is_refused(tmp_path, endpoint, authority):
    ca = tmp_path / "ca.pem"
    ca.write_bytes(open(authority.ca_file, "rb").read())
    ca.chmod(0o666)
    with pytest.raises(Exception, match="ca_file.*writable"):
        scan(tmp_path, tree_of(tmp_path), http("https://127.0.0.1:1", ca_file=str(ca)))


#: Opened by ``opened()`` (or an endpoint's answer): a ``gated`` scan holds its last 10 records until then.
GATE = threading.Event()


def ticks(tmp_path, sink, count, every=0.0, gate=None):
    """``count`` records, one every ``every`` seconds; the last 10 only once ``gate`` is open."""
    def wait(n):
        if n == count - 10 and gate is not None:
            assert gate.wait(30)

    return run({"plugins": ["http_sink"], "state_dir": str(tmp_path / "state"), "sinks": [sink],
                "sources": [feed(events(count, every=every, before=wait))]})


def gated(tmp_path, sink, first):
    """``first`` records, then 10 more once ``opened()`` answered a request: the scan runs until then."""
    GATE.clear()
    return ticks(tmp_path, sink, first + 10, gate=GATE)


def opened():
    """A success that lets ``gated``'s last records go."""
    GATE.set()
    return 200, {}, b"ok"


@pytest.mark.parametrize("preset", [None, "elasticsearch"])
def test_an_outage_in_the_middle_of_a_scan_loses_nothing_and_sends_nothing_twice(tmp_path, endpoint, preset):
    outage, back = threading.Event(), threading.Event()

    def come_back():
        endpoint.up()
        back.set()

    def go_down_once(ep):  # after the first 50 records, the server is gone for 0.6 s
        if len(ep.records()) >= 50 and not outage.is_set():
            outage.set()
            threading.Thread(target=ep.down).start()
            threading.Timer(0.6, come_back).start()

    endpoint.on_request = go_down_once
    result = ticks(tmp_path, http(endpoint.url, batch=10, preset=preset), 400, 0.004,
                   gate=back)  # the scan still runs when the server comes back
    sink = result.session.find("sink", "http")
    assert outage.is_set() and sink.stats()["failed_attempts"] >= 1
    sent = [r.id for r in result.records]
    assert len(set(sent)) == 400
    received = endpoint.ids()
    assert set(received) == set(sent)  # each id arrived
    assert len(received) == len(set(received))  # and once: nothing spooled or sent twice
    assert [d["n"] for d in endpoint.records()] == list(range(400))  # in order
    assert sink.stats()["depth"] == 0 and result.summary.errors == 0


def test_a_bad_request_is_dropped_counted_and_an_error_of_the_run(tmp_path, endpoint, capsys, caplog):
    endpoint.answer = lambda request: (400, {}, b"\x1b[2Jinvalid document\n" + b"x" * 5000)
    tree = tree_of(tmp_path, 0, 1)
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text(json.dumps({
        "version": 1, "plugins": ["http_sink", "yara_backend"], "engines": ["yara"],
        "state_dir": str(tmp_path / "state"), "sinks": [http(endpoint.url)]}))
    assert main(["scan", "-p", str(pipeline), "--all", str(tree)]) == 2  # errors, no detection
    assert len(endpoint.requests) == 1  # not retried
    line = next(line for line in caplog.text.splitlines() if "refused by the endpoint" in line)
    assert "1 record(s) refused by the endpoint, not retried: HTTP 400: \\x1b[2Jinvalid document\\n" in line
    assert "\x1b" not in line and len(line) < 600  # escaped and bounded
    (tmp_path / "empty").mkdir()  # and the next run does not send it again
    assert main(["scan", "-p", str(pipeline), str(tmp_path / "empty")]) == 0
    assert len(endpoint.requests) == 1


def test_a_hung_endpoint_does_not_hold_the_scan(tmp_path, caplog):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)  # accepts connections (the kernel does), never answers
    try:
        started = time.monotonic()
        result = ticks(tmp_path, http(f"http://127.0.0.1:{listener.getsockname()[1]}", timeout="300ms",
                                      retry={"initial": "10s", "max": "10s"}), 50)
        assert time.monotonic() - started < 10
    finally:
        listener.close()
    sink = result.session.find("sink", "http")
    assert sink.stats()["depth"] == 50 and sink.stats()["delivered"] == 0  # kept for the next run
    # The call began as the sink closed (the scan ends as soon as its source does): it met its deadline
    # within close()'s wait, or close() left it (the deadline itself: the byte-at-a-time test below).
    assert ("no whole answer within 0.3s" in caplog.text
            or "a delivery call did not end within 0.3s; leaving it" in caplog.text)


def test_an_endpoint_that_answers_a_byte_at_a_time_is_cut_at_the_deadline(tmp_path, caplog):
    """Each byte comes before a socket timeout would fire: only the call's deadline ends it."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    stop = threading.Event()

    def trickle():
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=dribble, args=(conn,), daemon=True).start()

    def dribble(conn):
        with conn:
            for byte in b"HTTP/1.1 200 OK\r\nX-Slow: " + b"x" * 10000:
                if stop.wait(0.05):
                    return
                try:
                    conn.send(bytes([byte]))
                except OSError:
                    return

    threading.Thread(target=trickle, daemon=True).start()
    try:
        started = time.monotonic()
        # the records come over 1.5 s, so the first call meets its deadline while the scan still runs (at
        # the scan's end, close() may cut a call first: the hung-endpoint test above)
        result = ticks(tmp_path, http(f"http://127.0.0.1:{listener.getsockname()[1]}", timeout="500ms",
                                      retry={"initial": "10s", "max": "10s"}), 5, every=0.3)
        assert time.monotonic() - started < 10
    finally:
        stop.set()
        listener.close()
    assert result.session.find("sink", "http").stats()["depth"] == 5
    assert "TimeoutError: no whole answer within 0.5s" in caplog.text


def test_retry_after_is_kept_within_retry_max(tmp_path, endpoint):
    answers = iter([(429, {"Retry-After": "1"}, b"slow down"), (503, {"Retry-After": "3600"}, b"later")])
    times = []

    def answer(request):
        times.append(time.monotonic())
        return next(answers, None) or opened()

    endpoint.answer = answer
    gated(tmp_path, http(endpoint.url, retry={"initial": "20ms", "max": "1.5s"}, timeout="5s"), 3)
    assert len(times) >= 3
    assert times[1] - times[0] >= 0.95  # Retry-After: 1, longer than the backoff
    assert times[2] - times[1] <= 1.6 + 1  # Retry-After: 3600, cut to retry.max


def test_a_redirect_is_not_followed(tmp_path, endpoint, caplog):
    elsewhere = type(endpoint)()
    try:
        endpoint.answer = lambda request: (307, {"Location": elsewhere.url + "/x"}, b"")
        result = ticks(tmp_path, http(endpoint.url, timeout="300ms"), 2)
        assert elsewhere.requests == [] and result.session.find("sink", "http").stats()["depth"] == 2
        assert "HTTP 307: a redirect to http://127.0.0.1:" in caplog.text and "is not followed" in caplog.text
    finally:
        elsewhere.down()


@pytest.mark.parametrize("options,message", [
    ({"url": "ftp://example.net/"}, "url: expected http://"),
    ({"url": "https://user:pw@example.net/"}, "credentials do not go in the URL"),
    ({"url": "https://example.net/", "preset": "splunk", "body": "array"}, "the splunk preset sets the body"),
    ({"url": "https://example.net/", "headers": {"Content-Length": "1"}}, "Content-Length is set by the sink"),
    ({"url": "https://example.net/", "headers": {"X-Key": "a\r\nX-Evil: 1"}}, "line break"),
    ({"url": "https://example.net/", "headers": {"X-Key": 123456789}}, r"headers.X-Key: expected a string, got int \(not shown\)"),
    ({"url": "https://example.net/", "token": 123456789}, r"token: expected a string, got int \(not shown\)"),
    ({"url": "https://example.net/", "preset": "elasticsearch", "index": "Bad Index"}, "not an index name"),
    ({"url": "http://example.net/", "ca_file": "ca.pem"}, "ca_file and tls_verify are for an https"),
    ({"url": "https://example.net/", "sourcetype": "x"}, "sourcetype is for preset: splunk"),
    ({"url": "https://example.net/", "token": "t", "headers": {"authorization": "x"}}, "give one or the other"),
])
def test_options_that_cannot_work_are_refused(tmp_path, options, message):
    with pytest.raises(ConfigError, match=message):
        ticks(tmp_path, {"use": "http", "with": options}, 1)


def test_bodies_of_each_kind(tmp_path, endpoint):
    """Every body kind, as the test server's parser reads it, gives back the documents sent."""
    for n, options in enumerate([{}, {"body": "array"}, {"preset": "elasticsearch"}, {"preset": "splunk"}]):
        endpoint.requests.clear()
        result = ticks(tmp_path / str(n), http(endpoint.url, **options), 5)
        docs = [d for r in endpoint.requests for d in endpoint.documents(r)]
        assert [d["id"] for d in docs] == [r.id for r in result.records], options
    assert os.path.isdir(tmp_path / "0" / "state" / "delivery")

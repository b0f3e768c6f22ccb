"""The ``syslog`` sink over real sockets bound by the test: a Unix datagram socket (as /dev/log), UDP
and TCP; RFC 5424 messages, ASCII whatever the file name, bounded in size, spooled while syslog is down."""

import json
import os
import re
import socket

from hypothesis import given, settings
from hypothesis import strategies as st

from elkscan_core.testing import eicar, run
from elkscan_file_sink.syslog import _bounded, parse_address

RFC5424 = re.compile(rb"<(\d{1,3})>1 (\S+Z) (\S+) elkscan (\d+) (\S+) - (.*)", re.S)


def scan(tmp_path, tree, **options):
    return run({"plugins": ["file_sink", "yara_backend"], "engines": ["yara"], "state_dir": str(tmp_path / "state"),
                "sources": [{"use": "dirscan", "with": {"roots": {str(tree): -1}, "type_filter": False}}],
                "sinks": [{"use": "syslog", "with": {"flush_interval": "50ms", "timeout": "2s", **options}}]})


def parse(message: bytes):
    match = RFC5424.fullmatch(message)
    assert match, message
    pri, _, host, pid, msgid, text = match.groups()
    assert text.isascii()
    return int(pri), host.decode(), int(pid), msgid.decode(), json.loads(text)


def eicar_tree(tmp_path, name=b"eicar.com"):
    tree = tmp_path / "tree"
    tree.mkdir(exist_ok=True)
    with open(os.path.join(os.fsencode(tree), name), "wb") as f:
        f.write(eicar())
    return tree


def unix_socket(path):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(5)
    return sock


def test_rfc5424_to_a_unix_datagram_socket(tmp_path):
    listener = unix_socket(tmp_path / "log.sock")
    tree = eicar_tree(tmp_path, b"eicar-\xff\xfe.com")  # a name that is not UTF-8
    result = scan(tmp_path, tree, address=str(tmp_path / "log.sock"))
    pri, host, pid, msgid, doc = parse(listener.recv(65536))
    assert pri == 3 * 8 + 4 and msgid == "finding" and pid == os.getpid()  # daemon.warning
    assert host == result.session.host and doc["id"] == result.records[0].id
    assert doc["signature"] == "Multios_TestFile_Eicar" and doc["path_bytes"].endswith("eicar-\\xff\\xfe.com")


def test_udp_and_ecs(tmp_path):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.settimeout(5)
        port = listener.getsockname()[1]
        scan(tmp_path, eicar_tree(tmp_path), address=f"127.0.0.1:{port}", facility="local3", format="ecs")
        pri, _, _, _, doc = parse(listener.recv(65536))
    assert pri == 19 * 8 + 4 and doc["rule"]["name"] == "Multios_TestFile_Eicar"


def test_tcp_with_octet_counting(tmp_path):
    tree = eicar_tree(tmp_path)
    (tree / "eicar2.com").write_bytes(eicar())
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        listener.settimeout(5)
        scan(tmp_path, tree, address=f"tcp://127.0.0.1:{listener.getsockname()[1]}")
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(5)
            data = b""
            while chunk := conn.recv(65536):
                data += chunk
    messages = []
    while data:  # RFC 6587: "<length> <message>"
        length, _, rest = data.partition(b" ")
        messages.append(rest[:int(length)])
        data = rest[int(length):]
    assert sorted(os.path.basename(parse(m)[4]["path"]) for m in messages) == ["eicar.com", "eicar2.com"]


def test_records_wait_in_the_spool_while_syslog_is_down(tmp_path):
    tree = eicar_tree(tmp_path)
    address = str(tmp_path / "log.sock")
    first = scan(tmp_path, tree, address=address, timeout="300ms")  # nobody listens: ENOENT, retried
    assert first.session.find("sink", "syslog").stats()["depth"] == 1
    listener = unix_socket(address)
    empty = tmp_path / "empty"
    empty.mkdir()
    scan(tmp_path, empty, address=address)
    assert parse(listener.recv(65536))[4]["id"] == first.records[0].id
    listener.settimeout(0.3)
    try:
        extra = listener.recv(65536)
    except TimeoutError:
        extra = None
    assert extra is None  # sent once


def test_a_message_is_bounded_and_stays_json(tmp_path):
    listener = unix_socket(tmp_path / "log.sock")
    deep = tmp_path / "tree" / ("d" * 200) / ("e" * 200)
    deep.mkdir(parents=True)
    (deep / "eicar.com").write_bytes(eicar())
    scan(tmp_path, tmp_path / "tree", address=str(tmp_path / "log.sock"), max_message=480)
    message = listener.recv(65536)
    _, _, _, _, doc = parse(message)
    assert len(message) <= 480 and doc["signature"] == "Multios_TestFile_Eicar" and doc["truncated"]


def test_addresses():
    assert parse_address("/dev/log") == ("unix", "/dev/log")
    assert parse_address("logs.example.net:514") == ("udp", ("logs.example.net", 514))
    assert parse_address("tcp://[::1]:6514") == ("tcp", ("::1", 6514))
    for bad in ("logs:0", "logs", "http://logs:514", "logs:99999"):
        try:
            parse_address(bad)
        except ValueError:
            continue
        raise AssertionError(bad)


fields = st.dictionaries(st.text(max_size=12), st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=300),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20), max_size=12)


@settings(max_examples=300, deadline=None)
@given(fields, st.integers(min_value=380, max_value=4000))
def test_fuzz_any_document_fits_its_bound_as_ascii_json(doc, limit):
    data = _bounded(doc, limit)
    assert len(data) <= limit and data.isascii() and b"\n" not in data
    assert isinstance(json.loads(data), dict)

"""What endpoints answer, read as untrusted bytes: status verdicts, Retry-After, body excerpts and the
per-record verdicts of Elasticsearch ``_bulk`` answers; with hypothesis fuzz tests of each parser
(ELKSCAN_FUZZ_EXAMPLES sets their example count, 2000 by default)."""

from __future__ import annotations

import email.utils
import json
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from elkscan_core.text import hidden
from elkscan_http_sink.answers import (DELIVERED, REFUSED, RETRY, ItemVerdict, bulk_verdicts, excerpt,
                                       parse_retry_after, verdict)

EXAMPLES = int(os.environ.get("ELKSCAN_FUZZ_EXAMPLES", "2000"))
NOW = 1_800_000_000.0


@pytest.mark.parametrize("status,expected", [
    (200, DELIVERED), (201, DELIVERED), (204, DELIVERED), (400, REFUSED), (404, REFUSED), (413, REFUSED),
    (408, RETRY), (429, RETRY), (401, RETRY), (403, RETRY), (500, RETRY), (503, RETRY), (301, RETRY),
    (307, RETRY), (100, RETRY)])
def test_verdicts(status, expected):
    assert verdict(status) == expected


def test_retry_after():
    assert parse_retry_after("120", NOW) == 120.0
    assert parse_retry_after(" 0 ", NOW) == 0.0
    assert parse_retry_after(email.utils.formatdate(NOW + 30, usegmt=True), NOW) == 30.0
    assert parse_retry_after(email.utils.formatdate(NOW - 30, usegmt=True), NOW) == 0.0  # past: now
    assert parse_retry_after("99999999999", NOW) == 7 * 86400.0  # at most a week
    for junk in (None, "", "-1", "1.5", "soon", "Fri, 31 Dec 99999 23:59:59 GMT", "Mon, 32 Foo 2026", "\x00"):
        assert parse_retry_after(junk, NOW) is None


def test_excerpt_is_short_printable_and_exact_about_bytes():
    assert excerpt(b"plain") == "plain"
    assert excerpt(b"\x1b[2J\nbad\xff") == "\\x1b[2J\\nbad\\xff"
    long = excerpt(b"x" * 5000)
    assert long == "x" * 200 + "..."


def bulk(items, errors=True):
    return json.dumps({"took": 1, "errors": errors, "items": items}).encode()


def test_bulk_verdicts():
    ids = ["a", "b", "c", "d", "e", "f"]
    items = [{"create": {"_id": "a", "status": 201}},
             {"create": {"_id": "b", "status": 409, "error": {"type": "version_conflict_engine_exception"}}},
             {"create": {"_id": "c", "status": 400, "error": {"type": "mapper_parsing_exception",
                                                             "reason": "failed to parse\n[x]"}}},
             {"create": {"_id": "d", "status": 429, "error": {"type": "es_rejected_execution_exception"}}},
             {"index": {"status": 503, "error": "an old server's string"}},
             {"create": {"_id": "f", "status": 404, "error": {"type": "index_not_found_exception", "reason": 7}}}]
    assert bulk_verdicts(bulk(items), ids) == [
        ItemVerdict(DELIVERED), ItemVerdict(DELIVERED),
        ItemVerdict(REFUSED, "HTTP 400 mapper_parsing_exception: failed to parse\\n[x]"),
        ItemVerdict(RETRY, "HTTP 429 es_rejected_execution_exception"),
        ItemVerdict(RETRY, "HTTP 503 an old server's string"),
        ItemVerdict(REFUSED, "HTTP 404 index_not_found_exception: 7")]
    assert bulk_verdicts(bulk([], errors=False), ids) == [ItemVerdict(DELIVERED)] * 6


@pytest.mark.parametrize("body,problem", [
    (b"<html>502 Bad Gateway</html>", "not JSON"),
    (b"[]", "no 'errors' flag"),
    (b'{"errors": "yes"}', "no 'errors' flag"),
    (b'{"errors": true}', "no items for 2 records"),
    (bulk([{"create": {"_id": "a", "status": 201}}]), "1 items for 2 records"),
    (bulk([{"create": {"_id": "b", "status": 201}}, {"create": {"_id": "a", "status": 201}}]), "not the records sent"),
    (bulk([{"create": {"_id": "a", "status": True}}, {"create": {"_id": "b", "status": 201}}]), "no status"),
    (bulk([{"create": {}, "index": {}}, {"create": {"status": 201}}]), "not one action"),
    (b"[" * 100000 + b"]" * 100000, "not JSON"),
])
def test_what_is_not_a_bulk_answer_is_said(body, problem):
    with pytest.raises(ValueError, match=problem):
        bulk_verdicts(body, ["a", "b"])


def one_line(text):
    """Nothing a terminal or a log reader would obey: no control or format character, no line break."""
    return not any(hidden(c) for c in text)


def _check_verdicts(result, ids):
    assert len(result) == len(ids)
    for item in result:
        assert item.verdict in (DELIVERED, RETRY, REFUSED)
        assert one_line(item.reason) and len(item.reason) < 300
        assert (item.reason == "") == (item.verdict == DELIVERED)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12)
ids = st.lists(st.text("0123456789abcdef", min_size=1, max_size=8), min_size=1, max_size=6)
statuses = st.integers(0, 700) | st.sampled_from([201, 400, 409, 429, 503]) | st.booleans() | st.none() | st.text(max_size=3)
errors = st.none() | st.text(max_size=300) | st.fixed_dictionaries(
    {}, optional={"type": st.text(max_size=40) | st.integers(), "reason": st.text(max_size=400) | json_values})


@st.composite
def bulk_answers(draw):
    """Answers shaped like ``_bulk``'s, with any field wrong: statuses, ids, errors, counts, actions."""
    sent = draw(ids)
    items = []
    for n in range(draw(st.integers(0, len(sent) + 1))):
        result = {"status": draw(statuses), "error": draw(errors)}
        if draw(st.booleans()):
            result["_id"] = sent[n] if n < len(sent) and draw(st.integers(0, 9)) else draw(st.text(max_size=4))
        action = draw(st.sampled_from(["create", "index", "update", "delete", ""]))
        items.append({action: result} if draw(st.integers(0, 9)) else draw(json_values))
    answer = {"errors": draw(st.sampled_from([True, True, False, None, 1, "true"])), "items": items}
    if draw(st.booleans()):
        answer["took"] = draw(json_values)
    return json.dumps(answer).encode(), sent


@settings(max_examples=EXAMPLES, deadline=None)
@given(bulk_answers())
def test_fuzz_bulk_answers_give_one_verdict_per_record_or_valueerror(case):
    body, sent = case
    try:
        result = bulk_verdicts(body, sent)
    except ValueError:
        return
    _check_verdicts(result, sent)


@settings(max_examples=EXAMPLES, deadline=None)
@given(st.binary(max_size=400), ids)
def test_fuzz_any_bytes_as_a_bulk_answer(body, sent):
    try:
        result = bulk_verdicts(body, sent)
    except ValueError:
        return
    _check_verdicts(result, sent)


http_dates = st.builds(lambda t: email.utils.formatdate(t, usegmt=True), st.floats(0, 4e9))


@settings(max_examples=EXAMPLES, deadline=None)
@given(st.none() | st.text(max_size=80) | st.integers(-10**15, 10**15).map(str) | http_dates
       | st.text("0123456789 ,:-ADFGJMNOSTWabceghilnoprtuvy", max_size=40))
def test_fuzz_retry_after_is_none_or_a_bounded_wait(value):
    wait = parse_retry_after(value, NOW)
    assert wait is None or 0.0 <= wait <= 7 * 86400.0


@settings(max_examples=EXAMPLES, deadline=None)
@given(st.binary(max_size=2000), st.integers(1, 300))
def test_fuzz_an_excerpt_is_one_short_printable_line(body, limit):
    text = excerpt(body, limit)
    assert one_line(text) and len(text) <= limit + 3

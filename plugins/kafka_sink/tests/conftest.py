"""librdkafka's mock cluster for the Kafka sink's tests: a Kafka protocol server in this process, from
the very librdkafka that confluent-kafka loaded, driven through its C API (``rd_kafka_mock_*``, which
confluent-kafka does not wrap): brokers taken down and brought back, errors set on a topic."""

from __future__ import annotations

import ctypes
import time

import confluent_kafka
import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

_PRODUCER = 0  # rd_kafka_type_t


def _librdkafka() -> ctypes.CDLL:
    """The librdkafka confluent-kafka runs on (the wheel's bundled copy, or the system's)."""
    import confluent_kafka.cimpl  # noqa: F401  (loads it)

    with open("/proc/self/maps") as maps:
        paths = {line.split()[-1] for line in maps if "librdkafka" in line.rsplit("/", 1)[-1]}
    assert len(paths) == 1, paths
    lib = ctypes.CDLL(paths.pop())
    p, i32, i16 = ctypes.c_void_p, ctypes.c_int32, ctypes.c_int16
    for name, restype, argtypes in (
            ("rd_kafka_conf_new", p, []),
            ("rd_kafka_new", p, [ctypes.c_int, p, ctypes.c_char_p, ctypes.c_size_t]),
            ("rd_kafka_destroy", None, [p]),
            ("rd_kafka_mock_cluster_new", p, [p, ctypes.c_int]),
            ("rd_kafka_mock_cluster_destroy", None, [p]),
            ("rd_kafka_mock_cluster_bootstraps", ctypes.c_char_p, [p]),
            ("rd_kafka_mock_broker_set_down", ctypes.c_int, [p, i32]),
            ("rd_kafka_mock_broker_set_up", ctypes.c_int, [p, i32]),
            ("rd_kafka_mock_topic_create", ctypes.c_int, [p, ctypes.c_char_p, ctypes.c_int, ctypes.c_int]),
            ("rd_kafka_mock_topic_set_error", None, [p, ctypes.c_char_p, ctypes.c_int]),
            ("rd_kafka_mock_push_request_errors_array", None, [p, i16, ctypes.c_size_t,
                                                                ctypes.POINTER(ctypes.c_int)])):
        function = getattr(lib, name)
        function.restype, function.argtypes = restype, argtypes
    return lib


class MockCluster:
    """``brokers`` (its bootstrap address); ``down()``/``up()`` close and reopen every broker's listener;
    ``topic_error(topic, code)`` makes the topic answer with that error; ``consume(topic)`` reads it."""

    PRODUCE, INIT_PRODUCER_ID = 0, 22  # requests' API keys

    def __init__(self, count: int = 1) -> None:
        self.lib = lib = _librdkafka()
        self.count = count
        errors = ctypes.create_string_buffer(512)
        conf = lib.rd_kafka_conf_new()
        self._handle = lib.rd_kafka_new(_PRODUCER, conf, errors, len(errors))
        assert self._handle, errors.value
        self._cluster = lib.rd_kafka_mock_cluster_new(self._handle, count)
        assert self._cluster
        self.brokers = lib.rd_kafka_mock_cluster_bootstraps(self._cluster).decode()

    def create_topic(self, topic: str, partitions: int = 3) -> None:
        assert self.lib.rd_kafka_mock_topic_create(self._cluster, topic.encode(), partitions, self.count) == 0

    def down(self) -> None:
        for broker in range(1, self.count + 1):
            assert self.lib.rd_kafka_mock_broker_set_down(self._cluster, broker) == 0

    def up(self) -> None:
        for broker in range(1, self.count + 1):
            assert self.lib.rd_kafka_mock_broker_set_up(self._cluster, broker) == 0

    def topic_error(self, topic: str, code: int) -> None:
        self.lib.rd_kafka_mock_topic_set_error(self._cluster, topic.encode(), code)

    def request_errors(self, api_key: int, *codes: int) -> None:
        """The next requests of this kind are answered with these errors, one each."""
        array = (ctypes.c_int * len(codes))(*codes)
        self.lib.rd_kafka_mock_push_request_errors_array(self._cluster, api_key, len(codes), array)

    def consume(self, topic: str, expect: int, within: float = 30.0) -> list[confluent_kafka.Message]:
        """Every message of ``topic`` (from the start), once ``expect`` of them arrived or ``within`` passed."""
        consumer = Consumer({"bootstrap.servers": self.brokers, "group.id": f"test-{time.monotonic_ns()}",
                             "auto.offset.reset": "earliest", "enable.auto.commit": False})
        try:
            consumer.subscribe([topic])
            messages: list[confluent_kafka.Message] = []
            deadline = time.monotonic() + within
            while len(messages) < expect and time.monotonic() < deadline:
                message = consumer.poll(0.2)
                if message is not None and message.error() is None:
                    messages.append(message)
            return messages
        finally:
            consumer.close()

    def produce(self, topic: str, values: list[bytes], keys: list[bytes] | None = None) -> None:
        """Put ``values`` on ``topic`` (keyed by ``keys``, else by their index), every one acknowledged."""
        producer = Producer({"bootstrap.servers": self.brokers, "message.max.bytes": 3_000_000})
        failed = []
        for index, value in enumerate(values):
            key = keys[index] if keys else str(index).encode()
            producer.produce(topic, value=value, key=key, on_delivery=lambda err, _m: err and failed.append(err))
            producer.poll(0)
        assert producer.flush(30) == 0 and not failed, failed

    def committed(self, group: str, topic: str, partitions: int) -> dict[int, int]:
        """The group's committed offset of each partition (-1001: none)."""
        consumer = Consumer({"bootstrap.servers": self.brokers, "group.id": group})
        try:
            offsets = consumer.committed([TopicPartition(topic, p) for p in range(partitions)], timeout=10)
            return {tp.partition: tp.offset for tp in offsets}
        finally:
            consumer.close()

    def ends(self, topic: str, partitions: int) -> dict[int, int]:
        """Each partition's high watermark: the offset the next message will have."""
        consumer = Consumer({"bootstrap.servers": self.brokers, "group.id": "ends"})
        try:
            return {p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
                    for p in range(partitions)}
        finally:
            consumer.close()

    def close(self) -> None:
        self.lib.rd_kafka_mock_cluster_destroy(self._cluster)
        self.lib.rd_kafka_destroy(self._handle)


@pytest.fixture
def cluster():
    mock = MockCluster()
    yield mock
    mock.close()

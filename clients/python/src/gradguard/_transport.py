"""Getting summaries to the service and advice back, off the training thread.

The training loop only ever appends to a bounded buffer (`Outbox`); a
background thread owns the connection. When the service is unreachable the
buffer keeps the newest summaries and counts the ones it drops, the thread
reconnects with exponential backoff and jitter, and a new stream starts with a
new Hello. Only a refusal no retry can change (UNAUTHENTICATED,
PERMISSION_DENIED) stops it for good, logged once and kept in the stats.
Nothing here raises into the training loop.
"""

from __future__ import annotations

import collections
import logging
import random
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ._security import Endpoint
from .v1 import gradguard_pb2 as pb

if TYPE_CHECKING:
    import grpc

log = logging.getLogger("gradguard")

# Reconnect backoff: first wait, cap, and the multiplier between tries.
BACKOFF_FIRST = 0.1
BACKOFF_MAX = 10.0
BACKOFF_FACTOR = 2.0


@dataclass
class TransportStats:
    sent: int = 0  # summaries
    messages: int = 0  # that carried them
    urgent: int = 0  # summaries sent at once, without lingering
    dropped: int = 0
    connects: int = 0
    advice: int = 0
    connected: bool = False
    last_error: str = ""
    refused: bool = False  # the service refused this worker's credentials: no more retries


class Outbox:
    """Messages waiting for the connection: acknowledgements first (few, and
    never dropped), then summaries (bounded; the oldest goes when full).

    Summaries linger: the first one queued waits up to `linger` seconds for
    others to join it, and they leave together in one `SummaryBatch` (at most
    `max_batch`). An urgent summary, a full batch, `flush` and `close` send
    what is queued at once. Each message costs the sending process a few
    thread wake-ups in gRPC, whatever its size."""

    def __init__(self, capacity: int, stats: TransportStats, linger: float = 0.0, max_batch: int = 64):
        if capacity < 1:
            raise ValueError(f"buffer must be at least 1, got {capacity}")
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        self._summaries: collections.deque[pb.Summary] = collections.deque()
        self._acks: collections.deque[pb.AdviceAck] = collections.deque()
        self._capacity = capacity
        self._linger = linger
        self._max_batch = max_batch
        self._stats = stats
        self._cond = threading.Condition()
        self._closed = False
        self._woken = False
        self._due = 0.0  # when the queued summaries must leave (time.monotonic)
        self._last_put = 0  # the newest summary's step

    def put_summary(self, summary: pb.Summary, urgent: bool = False) -> None:
        with self._cond:
            if len(self._summaries) >= self._capacity:
                self._summaries.popleft()
                self._stats.dropped += 1
            if urgent or self._linger <= 0:
                self._due = 0.0
                self._stats.urgent += urgent
            elif not self._summaries:
                self._due = time.monotonic() + self._linger
            self._summaries.append(summary)
            self._last_put = max(self._last_put, summary.step)
            if self._due == 0.0 or len(self._summaries) == 1:
                self._cond.notify()

    def put_ack(self, ack: pb.AdviceAck) -> None:
        with self._cond:
            self._acks.append(ack)
            self._cond.notify()

    def flush(self) -> None:
        """The queued summaries leave now."""
        with self._cond:
            self._due = 0.0
            self._cond.notify()

    def take(self, timeout: float | None = None) -> pb.WorkerMessage | None:
        """The next message once one is due; None after `timeout` seconds
        without one, after `wake`, or when closed and empty."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while True:
                if self._acks:
                    return pb.WorkerMessage(ack=self._acks.popleft())
                now = time.monotonic()
                queued = len(self._summaries)
                if queued and (self._closed or self._due <= now or queued >= self._max_batch):
                    return self._batch()
                if self._woken or self._closed or (deadline is not None and now >= deadline):
                    self._woken = False
                    return None
                waits = [t - now for t in (deadline, self._due if queued else None) if t is not None]
                self._cond.wait(min(waits) if waits else None)

    def _batch(self) -> pb.WorkerMessage:
        if len(self._summaries) == 1:
            return pb.WorkerMessage(summary=self._summaries.popleft())
        n = min(len(self._summaries), self._max_batch)
        batch = pb.SummaryBatch(summaries=[self._summaries.popleft() for _ in range(n)])
        return pb.WorkerMessage(batch=batch)

    def wake(self) -> None:
        """Makes a `take` waiting now (or the next one) return None."""
        with self._cond:
            self._woken = True
            self._cond.notify_all()

    def forget_through(self, step: int) -> None:
        """Drops summaries the service already holds (a resumed stream)."""
        with self._cond:
            while self._summaries and self._summaries[0].step <= step:
                self._summaries.popleft()

    def settled_through(self) -> int:
        """On a new stream: steps up to this one will not be sent any more
        (sent on an earlier stream, whether the service got them or not);
        those queued will."""
        with self._cond:
            return self._summaries[0].step - 1 if self._summaries else self._last_put

    def empty(self) -> bool:
        with self._cond:
            return not self._acks and not self._summaries

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    @property
    def closed(self) -> bool:
        return self._closed


class Progress:
    """How far the service has decided on this stream's summaries, when its
    Welcome said it reports that (gRPC, `Hello.report_progress`). Lets the
    training loop wait until it is at most `max_lag` steps ahead."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._step = 0
        self._active = False

    def start(self, active: bool, step: int) -> None:
        """A new stream was welcomed: the service holds steps through `step`."""
        with self._cond:
            self._active, self._step = active, step
            self._cond.notify_all()

    def advance(self, step: int) -> None:
        with self._cond:
            self._step = max(self._step, step)
            self._cond.notify_all()

    def stop(self) -> None:
        """The stream is gone: nobody waits for a service that is down."""
        with self._cond:
            self._active = False
            self._cond.notify_all()

    def wait(self, step: int, timeout: float) -> bool:
        """Until the service has decided on `step`, or no stream reports
        progress; False after `timeout` seconds without either."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._active or self._step >= step, timeout)


class Connection(threading.Thread):
    """Base of the transports: a daemon thread that keeps one connection up
    and feeds the outbox into it until closed."""

    def __init__(
        self,
        hello: pb.Hello,
        outbox: Outbox,
        stats: TransportStats,
        on_advice: Callable[[pb.Advice], None],
        on_welcome: Callable[[pb.Welcome], None] | None = None,
        progress: Progress | None = None,
    ):
        super().__init__(name=f"gradguard-{hello.job}-{hello.rank}", daemon=True)
        self.hello = hello
        self.outbox = outbox
        self.stats = stats
        self.on_advice = on_advice
        self.on_welcome: Callable[[pb.Welcome], None] = on_welcome or (lambda welcome: None)
        self.progress = progress or Progress()
        self._halt = threading.Event()
        self._quiet_errors: set[str] = set()

    def stop(self, flush_timeout: float) -> None:
        """Sends what is buffered (for at most `flush_timeout` seconds while
        connected), then ends the stream and the thread."""
        deadline = time.monotonic() + flush_timeout
        self.outbox.flush()
        while self.stats.connected and not self.outbox.empty() and time.monotonic() < deadline:
            time.sleep(0.005)
        self._halt.set()
        self.progress.stop()
        self.outbox.close()
        self.join(timeout=max(0.5, deadline - time.monotonic()))

    def run(self) -> None:
        backoff = BACKOFF_FIRST
        while not self._halt.is_set():
            started = time.monotonic()
            try:
                self.session()
            except Exception as e:  # noqa: BLE001 -- a transport must never take the job down
                self._error(f"{type(e).__name__}: {e}")
            self.stats.connected = False
            self.progress.stop()
            if self._halt.is_set():
                break
            if time.monotonic() - started > 5 * BACKOFF_MAX:
                backoff = BACKOFF_FIRST  # it had been up for a while
            self._halt.wait(backoff * random.uniform(0.5, 1.5))
            backoff = min(backoff * BACKOFF_FACTOR, BACKOFF_MAX)

    def session(self) -> None:
        raise NotImplementedError

    def _count(self, msg: pb.WorkerMessage) -> None:
        """Counts the summaries a message carries, and the message if any."""
        kind = msg.WhichOneof("body")
        n = 1 if kind == "summary" else len(msg.batch.summaries) if kind == "batch" else 0
        self.stats.sent += n
        self.stats.messages += n > 0

    def _error(self, message: str) -> None:
        self.stats.last_error = message
        key = message.split(":", 1)[0]
        if key not in self._quiet_errors:  # once per kind of error, not every retry
            self._quiet_errors.add(key)
            log.warning("gradguard: %s (the job goes on; retrying in the background)", message)

    def _refuse(self, message: str) -> None:
        """A refusal no retry can change (credentials, scope): said once,
        kept in the stats, and the connection stops for good."""
        self.stats.last_error = message
        self.stats.refused = True
        log.error(
            "gradguard: the service refused this worker: %s (the job goes on unguarded; no more retries)", message
        )
        self._halt.set()


# Statuses a retry cannot change: the credentials or their scope are wrong.
REFUSALS = ("UNAUTHENTICATED", "PERMISSION_DENIED")
# In the details of a connection that failed at TLS, or at a plaintext
# client's first bytes to a TLS server.
TLS_SIGNS = ("TSI_", "SSL", "andshake", "Socket closed")


class GrpcConnection(Connection):
    """One bidirectional `Ingest.Stream` at a time."""

    def __init__(
        self,
        endpoint: Endpoint | str,
        hello: pb.Hello,
        outbox: Outbox,
        stats: TransportStats,
        on_advice: Callable[[pb.Advice], None],
        on_welcome: Callable[[pb.Welcome], None] | None = None,
        progress: Progress | None = None,
    ):
        super().__init__(hello, outbox, stats, on_advice, on_welcome, progress)
        self.endpoint = endpoint if isinstance(endpoint, Endpoint) else Endpoint.parse(endpoint)
        self.target = self.endpoint.target

    def session(self) -> None:
        import grpc

        from .v1 import gradguard_pb2_grpc

        welcomed = threading.Event()
        done = threading.Event()
        options: list[tuple[str, object]] = [
            ("grpc.keepalive_time_ms", 10_000),
            ("grpc.keepalive_timeout_ms", 5_000),
            ("grpc.max_send_message_length", 4 << 20),
        ]
        with self.endpoint.channel(options) as channel:
            call = gradguard_pb2_grpc.IngestStub(channel).Stream(
                self._requests(welcomed, done), metadata=self.endpoint.metadata()
            )
            try:
                for msg in call:
                    kind = msg.WhichOneof("body")
                    if kind == "welcome":
                        if msg.welcome.HasField("last_step"):
                            self.outbox.forget_through(msg.welcome.last_step)
                        self.on_welcome(msg.welcome)
                        # A summary lost with the old stream never gets its
                        # progress: nobody waits for it.
                        settled = max(msg.welcome.last_step, self.outbox.settled_through())
                        self.progress.start(msg.welcome.reports_progress, settled)
                        self.stats.connects += 1
                        self.stats.connected = True
                        self._quiet_errors.clear()
                        log.info("gradguard: streaming to %s (server %s)", self.endpoint, msg.welcome.server_version)
                        welcomed.set()
                    elif kind == "advice":
                        self.stats.advice += 1
                        self.on_advice(msg.advice)
                    elif kind == "progress":
                        self.progress.advance(msg.progress.step)
            except grpc.RpcError as e:
                if self._halt.is_set():
                    pass
                elif e.code().name in REFUSALS:
                    self._refuse(f"{e.code().name}: {e.details()}")
                else:
                    self._error(f"{e.code().name}: {e.details()}{self._hint(e)}")
            finally:
                done.set()
                self.outbox.wake()  # gRPC's thread may wait in `take` for the next message
                call.cancel()

    def _hint(self, e: grpc.RpcError) -> str:
        """What to check when the connection failed at TLS (a plaintext
        client of a TLS server sees only a closed socket, a client without
        the certificate a mutual-TLS server asks for, a corrupted record)."""
        details = e.details() or ""
        if e.code().name != "UNAVAILABLE" or not any(m in details for m in TLS_SIGNS):
            return ""
        if self.endpoint.tls:
            return (
                " (TLS: is the server serving TLS, does tls_ca hold the CA that signed its certificate,"
                " and does it ask for a client certificate (tls_cert, tls_key)?)"
            )
        return " (plaintext: is the server serving TLS? Then use https:// and tls_ca)"

    def _requests(self, welcomed: threading.Event, done: threading.Event) -> Iterator[pb.WorkerMessage]:
        yield pb.WorkerMessage(hello=self.hello)
        # Summaries wait for the Welcome: it says which steps the service
        # already holds from an earlier stream.
        while not welcomed.wait(0.05):
            if done.is_set() or self._halt.is_set():
                return
        while not done.is_set():
            msg = self.outbox.take()  # None: woken because the stream ended, or closed
            if msg is not None:
                self._count(msg)
                yield msg
            elif self.outbox.closed:
                return  # half-close: the service ends the stream


class KafkaConnection(Connection):
    """Cluster mode without gRPC: records to the summaries topic (key: job,
    header `rank`), advice read from the advice topic."""

    def __init__(
        self,
        brokers: str,
        topics: tuple[str, str],
        properties: Mapping[str, Any],
        hello: pb.Hello,
        outbox: Outbox,
        stats: TransportStats,
        on_advice: Callable[[pb.Advice], None],
        progress: Progress | None = None,
    ):
        super().__init__(hello, outbox, stats, on_advice, None, progress)
        try:
            import confluent_kafka  # noqa: F401
        except ImportError as e:
            raise ImportError("the Kafka transport needs confluent-kafka: pip install 'gradguard[kafka]'") from e
        self.brokers = brokers
        self.summaries_topic, self.advice_topic = topics
        self.properties = dict(properties)

    def session(self) -> None:
        from confluent_kafka import (
            OFFSET_END,
            Consumer,
            KafkaError,
            KafkaException,
            Message,
            Producer,
            TopicPartition,
        )

        config = {"bootstrap.servers": self.brokers, **self.properties}
        producer = Producer({**config, "enable.idempotence": True, "linger.ms": 5})
        consumer = Consumer(
            {
                **config,
                "group.id": f"gradguard-worker-{self.hello.job}-{self.hello.rank}",
                "enable.auto.commit": False,
            }
        )
        key = self.hello.job.encode()
        headers: list[tuple[str, str | bytes | None]] = [("rank", str(self.hello.rank).encode())]
        errors: list[str] = []

        def delivered(err: KafkaError | None, _msg: Message) -> None:
            if err is not None:
                errors.append(str(err))

        try:
            metadata = consumer.list_topics(self.advice_topic, timeout=5)
            topic = metadata.topics.get(self.advice_topic)
            if topic is None or topic.error is not None or not topic.partitions:
                raise KafkaException(f"advice topic {self.advice_topic} not found")
            consumer.assign([TopicPartition(self.advice_topic, p, OFFSET_END) for p in topic.partitions])

            def produce(msg: pb.WorkerMessage) -> None:
                producer.produce(
                    self.summaries_topic, msg.SerializeToString(), key, headers=headers, on_delivery=delivered
                )

            produce(pb.WorkerMessage(hello=self.hello))
            producer.flush(5)
            if errors:
                raise KafkaException(errors[-1])
            self.stats.connects += 1
            self.stats.connected = True
            self._quiet_errors.clear()
            log.info("gradguard: producing to %s on %s", self.summaries_topic, self.brokers)
            while True:
                msg = self.outbox.take(timeout=0.01)
                if msg is not None:
                    produce(msg)
                    self._count(msg)
                producer.poll(0)
                if errors:
                    raise KafkaException(errors[-1])
                for record in consumer.consume(num_messages=64, timeout=0 if msg is not None else 0.01):
                    value = record.value()
                    if record.error() is None and record.key() == key and value is not None:
                        reply = pb.ServerMessage.FromString(value)
                        if reply.WhichOneof("body") == "advice":
                            self.stats.advice += 1
                            self.on_advice(reply.advice)
                if msg is None and self.outbox.closed:
                    producer.flush(5)
                    return
        finally:
            consumer.close()

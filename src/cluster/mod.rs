//! Cluster mode on Kafka: the topics, their record formats, and the clients.
//!
//! Topics (names configurable; all keyed by job id):
//! - summaries: what workers send, as on the gRPC stream: a `WorkerMessage`
//!   (Hello, Summary or AdviceAck) with the sending rank in the `rank` header.
//!   The detectors form one consumer group over it, so one replica owns a job.
//! - advice: a `ServerMessage` with an Advice, for the job's workers.
//! - anomalies: an `Anomaly`; every replica's store reads all of it.
//! - state (compacted): a job's engine snapshot, written by its owner before it
//!   commits the offsets that produced it; the next owner restores from it. It
//!   must have as many partitions as summaries: a job's snapshot lives in the
//!   partition number of its summaries.
//!
//! Anomaly and advice ids come from the summary record that caused them
//! ([`record_id`]): a redelivered summary yields the same ids, so stores dedupe
//! by id and a replayed advice is recognisably the same advice.

pub mod detector;
pub mod feed;
mod link;
mod metrics;
mod pipeline;
pub mod relay;
pub mod worker;

pub use link::Link;
pub use metrics::ClusterMetrics;

use std::collections::BTreeMap;
use std::time::Duration;

use crate::config::RuleBook;
use crate::intake::{Reason, Refusal};
use crate::proto;
use anyhow::{Context, anyhow, bail};
use prost::Message as _;
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::types::RDKafkaErrorCode;
use serde::Deserialize;

/// The header naming the rank that sent a summaries-topic record.
pub const RANK_HEADER: &str = "rank";

/// The `[kafka]` section of the settings file (or, deprecated, of the rules file).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaConfig {
    /// `host:port[,host:port]`; `--kafka-brokers` overrides it.
    pub brokers: Option<String>,
    /// Consumer group of the detectors (one member per replica).
    pub group: String,
    pub topics: Topics,
    /// Partitions of the topics the service creates when they are missing.
    pub partitions: i32,
    /// librdkafka properties for every client, e.g. `"security.protocol" = "ssl"`.
    pub properties: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Topics {
    pub summaries: String,
    pub advice: String,
    pub anomalies: String,
    pub state: String,
}

impl Default for Topics {
    fn default() -> Self {
        Self {
            summaries: "gradguard.summaries".into(),
            advice: "gradguard.advice".into(),
            anomalies: "gradguard.anomalies".into(),
            state: "gradguard.state".into(),
        }
    }
}

impl Default for KafkaConfig {
    fn default() -> Self {
        Self {
            brokers: None,
            group: "gradguard-detectors".into(),
            topics: Topics::default(),
            partitions: 12,
            properties: BTreeMap::new(),
        }
    }
}

impl KafkaConfig {
    /// The `[kafka]` section of a rules file (defaults when absent), with
    /// `--kafka-brokers` applied. `None` when no broker is named: embedded
    /// mode. The section belongs in the settings file now
    /// ([`crate::service::settings`]); a rules file's is still read.
    pub fn resolve(book: &RuleBook, brokers: Option<&str>) -> anyhow::Result<Option<Self>> {
        let config: KafkaConfig = match book.section("kafka") {
            Some(table) => table.clone().try_into().context("[kafka]")?,
            None => KafkaConfig::default(),
        };
        config.with_brokers(brokers)
    }

    /// This section with `--kafka-brokers` applied (it overrides `brokers`),
    /// checked. `None` when no broker is named: embedded mode.
    pub fn with_brokers(mut self, brokers: Option<&str>) -> anyhow::Result<Option<Self>> {
        if let Some(b) = brokers {
            self.brokers = Some(b.to_owned());
        }
        if self.brokers.is_none() {
            return Ok(None);
        }
        self.validate()?;
        Ok(Some(self))
    }

    /// Checks what the TOML types cannot: named brokers, partitions, topic names.
    pub fn validate(&self) -> anyhow::Result<()> {
        if let Some(b) = self.brokers.as_deref()
            && b.trim().is_empty()
        {
            bail!("kafka brokers: must name at least one host:port, got {b:?}");
        }
        if !(1..=4096).contains(&self.partitions) {
            bail!("kafka.partitions: {} is out of range 1..=4096", self.partitions);
        }
        for (field, name) in [
            ("summaries", &self.topics.summaries),
            ("advice", &self.topics.advice),
            ("anomalies", &self.topics.anomalies),
            ("state", &self.topics.state),
        ] {
            if name.is_empty() {
                bail!("kafka.topics.{field}: must not be empty");
            }
        }
        let overridden = self.overridden_properties();
        if !overridden.is_empty() {
            tracing::warn!(
                properties = ?overridden,
                "[kafka.properties]: the service sets these itself on the clients that depend on them; the values given here apply to the other clients only"
            );
        }
        Ok(())
    }

    /// The configuration of one of the service's Kafka clients: the brokers,
    /// then the client's tuning defaults, then every `[kafka.properties]`
    /// entry (security and the like reach every client; a property overrides
    /// a default), then what the client needs to keep its delivery promises
    /// (its group, commits, idempotence, waiting for a broker that is away),
    /// which no property overrides. Every client the crate creates is built
    /// from this, and only from this.
    pub fn client_config(&self, client: Client<'_>) -> ClientConfig {
        let (defaults, required) = client.settings(&self.group);
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", self.brokers.as_deref().unwrap_or_default());
        for (k, v) in defaults {
            c.set(k, v);
        }
        for (k, v) in &self.properties {
            c.set(k, v);
        }
        for (k, v) in required {
            c.set(k, v);
        }
        c
    }

    /// The `[kafka.properties]` keys that some client sets itself, whatever
    /// the property says (see [`KafkaConfig::client_config`]).
    pub fn overridden_properties(&self) -> Vec<&str> {
        self.properties
            .keys()
            .map(String::as_str)
            .filter(|k| {
                Client::ALL
                    .iter()
                    .any(|c| c.settings(&self.group).1.iter().any(|(r, _)| r == k))
            })
            .collect()
    }

    /// A consumer outside any group, for reading partitions it assigns
    /// itself; with `eof`, it reports reaching the end of each partition.
    pub fn reader(&self, eof: bool) -> anyhow::Result<BaseConsumer> {
        self.client_config(Client::Reader { eof })
            .create()
            .context("cannot create a Kafka consumer")
    }

    /// Creates the topics that are missing, and checks that summaries and state
    /// have as many partitions as each other.
    pub async fn ensure_topics(&self) -> anyhow::Result<()> {
        let admin: AdminClient<DefaultClientContext> = self
            .client_config(Client::Admin)
            .create()
            .context("cannot create a Kafka admin client")?;
        let t = &self.topics;
        let compacted = [("cleanup.policy", "compact")];
        let topics = [
            NewTopic::new(&t.summaries, self.partitions, TopicReplication::Fixed(1)),
            NewTopic::new(&t.advice, self.partitions, TopicReplication::Fixed(1)),
            NewTopic::new(&t.anomalies, self.partitions, TopicReplication::Fixed(1)),
            NewTopic::new(&t.state, self.partitions, TopicReplication::Fixed(1)).set(compacted[0].0, compacted[0].1),
        ];
        let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
        let results = admin.create_topics(&topics, &opts).await.with_context(|| {
            format!(
                "cannot reach the Kafka brokers {}",
                self.brokers.as_deref().unwrap_or("")
            )
        })?;
        for result in results {
            match result {
                Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((topic, code)) => bail!("cannot create Kafka topic {topic}: {code}"),
            }
        }
        let summaries = self.partition_count(&t.summaries)?;
        let state = self.partition_count(&t.state)?;
        if summaries != state {
            bail!(
                "kafka.topics: {} has {summaries} partitions but {} has {state}; a job's state lives in the partition number of its summaries, so they must match",
                t.summaries,
                t.state
            );
        }
        Ok(())
    }

    /// Number of partitions of a topic, from the cluster's metadata.
    pub fn partition_count(&self, topic: &str) -> anyhow::Result<usize> {
        let reader = self.reader(false)?;
        let meta = reader
            .fetch_metadata(Some(topic), Duration::from_secs(10))
            .with_context(|| format!("cannot read the metadata of Kafka topic {topic}"))?;
        let t = meta
            .topics()
            .iter()
            .find(|t| t.name() == topic)
            .ok_or_else(|| anyhow!("Kafka topic {topic} does not exist"))?;
        if let Some(e) = t.error() {
            bail!("Kafka topic {topic}: {}", RDKafkaErrorCode::from(e));
        }
        Ok(t.partitions().len())
    }
}

/// Every librdkafka client the crate creates, for
/// [`KafkaConfig::client_config`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Client<'a> {
    /// Creates the missing topics at start.
    Admin,
    /// Outside any group: metadata, watermarks, and partitions it assigns
    /// itself (a new owner reading a job's state); with `eof`, it reports
    /// reaching the end of each partition.
    Reader { eof: bool },
    /// The detectors' consumer group over the summaries topic.
    DetectorConsumer,
    /// The detectors' advice, anomalies and state snapshots.
    DetectorProducer,
    /// A replica's store feed (anomalies, advice, state), in a group of its own.
    StoreFeed { replica: &'a str },
    /// A replica's gRPC streams into the summaries topic.
    Forwarder,
    /// The advice topic, for a replica's gRPC streams.
    Relay,
    /// A worker writing straight to Kafka (`simulate --kafka-brokers`): its summaries.
    WorkerProducer,
    /// Such a worker's advice, from the advice topic.
    WorkerAdvice,
    /// Such a worker watching the detectors' committed offsets.
    WorkerCommits,
}

/// Tuning defaults that `[kafka.properties]` may override.
const CONSUMER_DEFAULTS: &[(&str, &str)] = &[
    // A fetch returns within 10 ms even when the broker has nothing new
    // (some brokers hold an empty fetch for the whole `fetch.wait.max.ms`).
    ("fetch.wait.max.ms", "10"),
];
const PRODUCER_DEFAULTS: &[(&str, &str)] = &[("linger.ms", "2")];
/// librdkafka properties a client sets, in order.
type Settings = Vec<(&'static str, String)>;
/// The forwarder's queue bound, in KiB.
const FORWARDER_QUEUE_KBYTES: &str = "65536";

impl Client<'_> {
    /// One of each kind (a made-up replica name for the store feed).
    pub const ALL: [Client<'static>; 11] = [
        Client::Admin,
        Client::Reader { eof: false },
        Client::Reader { eof: true },
        Client::DetectorConsumer,
        Client::DetectorProducer,
        Client::StoreFeed { replica: "replica" },
        Client::Forwarder,
        Client::Relay,
        Client::WorkerProducer,
        Client::WorkerAdvice,
        Client::WorkerCommits,
    ];

    /// (defaults a property may override, settings none may) of this client.
    fn settings(&self, group: &str) -> (Settings, Settings) {
        let own =
            |pairs: &[(&'static str, &str)]| -> Settings { pairs.iter().map(|&(k, v)| (k, v.to_owned())).collect() };
        let consumer = own(CONSUMER_DEFAULTS);
        let producer = own(PRODUCER_DEFAULTS);
        // An idempotent producer; the service's own wait for a broker that
        // is away instead of failing what they accepted (a batch's offsets
        // stay uncommitted until everything it produced is in).
        let idempotent = ("enable.idempotence", "true".to_owned());
        let waits = ("message.timeout.ms", "0".to_owned());
        let no_commit = ("enable.auto.commit", "false".to_owned());
        let earliest = ("auto.offset.reset", "earliest".to_owned());
        match *self {
            Client::Admin => (vec![], vec![]),
            Client::Reader { eof } => (
                consumer,
                vec![
                    ("group.id", format!("{group}-reader")),
                    no_commit,
                    ("enable.partition.eof", eof.to_string()),
                ],
            ),
            Client::DetectorConsumer => (
                consumer,
                vec![
                    ("group.id", group.to_owned()),
                    no_commit,
                    earliest,
                    // The consumer lag gauge comes from these statistics.
                    ("statistics.interval.ms", "1000".to_owned()),
                ],
            ),
            Client::DetectorProducer => (producer, vec![idempotent, waits]),
            Client::StoreFeed { replica } => (
                consumer,
                vec![
                    ("group.id", format!("{group}-store-{replica}")),
                    ("enable.auto.commit", "true".to_owned()),
                    ("enable.auto.offset.store", "false".to_owned()),
                    earliest,
                ],
            ),
            Client::Forwarder => {
                let mut defaults = producer;
                defaults.push(("queue.buffering.max.kbytes", FORWARDER_QUEUE_KBYTES.to_owned()));
                (defaults, vec![idempotent, waits])
            }
            Client::Relay => (consumer, vec![("group.id", format!("{group}-relay")), no_commit]),
            // Retries until delivered, or librdkafka's default 5 minutes.
            Client::WorkerProducer => (producer, vec![idempotent]),
            Client::WorkerAdvice => (
                consumer,
                vec![
                    ("group.id", format!("{group}-worker")),
                    no_commit,
                    ("enable.partition.eof", "true".to_owned()),
                ],
            ),
            Client::WorkerCommits => (vec![], vec![("group.id", group.to_owned()), no_commit]),
        }
    }
}

/// A summaries-topic record's payload and headers: what a worker (or a
/// replica forwarding its stream) sends. [`rank_of`] reads the header back.
pub fn worker_record(rank: u32, body: proto::worker_message::Body) -> (Vec<u8>, OwnedHeaders) {
    let payload = proto::WorkerMessage { body: Some(body) }.encode_to_vec();
    let rank = rank.to_string();
    let headers = OwnedHeaders::new().insert(Header {
        key: RANK_HEADER,
        value: Some(rank.as_str()),
    });
    (payload, headers)
}

/// The rank a summaries-topic record carries in its header.
pub fn rank_of<M: Message>(m: &M) -> Option<u32> {
    rank_in(m.headers()?)
}

/// The rank in the first header named [`RANK_HEADER`]: its value as a
/// decimal `u32` (what `u32::from_str` reads: a leading `+` and leading
/// zeros pass), else none. Header names are read as librdkafka hands them
/// over, up to a first NUL byte. A header whose name is not UTF-8 is not the
/// rank header and is skipped: rdkafka's accessor panics on such a name (it
/// unwraps the conversion), and any producer can send one, so that panic is
/// caught here rather than ending the detector thread.
pub fn rank_in<H: Headers + ?Sized>(headers: &H) -> Option<u32> {
    let readable = |i: usize| std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| headers.try_get(i))).ok();
    (0..headers.count())
        .filter_map(|i| readable(i).flatten())
        .find(|h| h.key == RANK_HEADER)
        .and_then(|h| std::str::from_utf8(h.value?).ok()?.parse().ok())
}

/// A summaries-topic record, taken apart: the job its key names, the rank
/// of its header, and its payload (an encoded `WorkerMessage`; none reads as
/// empty).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SummariesRecord<'a> {
    pub job: &'a str,
    pub rank: u32,
    pub payload: &'a [u8],
}

/// Why a summaries-topic record was refused before its payload was read,
/// with its job when the key named one (for the log).
pub type RecordRefusal<'a> = (Option<&'a str>, Refusal);

/// Takes a summaries-topic record apart (a message's `key()`, `headers()`
/// and `payload()`): the key must be a non-empty UTF-8 job id, and a `rank`
/// header must name the rank ([`rank_in`]).
pub fn summaries_record<'a, H: Headers + ?Sized>(
    key: Option<&'a [u8]>,
    headers: Option<&H>,
    payload: Option<&'a [u8]>,
) -> Result<SummariesRecord<'a>, RecordRefusal<'a>> {
    let Some(job) = key.and_then(|k| std::str::from_utf8(k).ok()).filter(|j| !j.is_empty()) else {
        let refusal = Refusal::new(
            Reason::EmptyJob,
            "record key: must be the job id (the summaries topic is keyed by job)",
        );
        return Err((None, refusal));
    };
    let Some(rank) = headers.and_then(rank_in) else {
        let refusal = Refusal::new(Reason::NoRank, "header rank: missing or not a number");
        return Err((Some(job), refusal));
    };
    Ok(SummariesRecord {
        job,
        rank,
        payload: payload.unwrap_or_default(),
    })
}

/// Index bits of a [`record_id`]: findings and advice per summary beyond this
/// many get no id of their own and are dropped (counted).
pub const RECORD_INDEX_LIMIT: usize = 1 << 11;

/// A cluster-wide id for the `index`-th anomaly or advice caused by the record
/// at (`partition`, `offset`) of the summaries topic, or by the periodic check
/// made after it (`tick`): partition + 1 in the top 12 bits, the offset in the
/// next 40, the tick flag, then 11 bits of index. Deterministic, so a
/// redelivered record maps to the same ids.
pub fn record_id(partition: i32, offset: i64, tick: bool, index: usize) -> u64 {
    debug_assert!(index < RECORD_INDEX_LIMIT);
    let partition = (partition as u64 + 1) & 0xfff;
    let offset = (offset.max(0) as u64) & ((1 << 40) - 1);
    (partition << 52) | (offset << 12) | (u64::from(tick) << 11) | index as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_ids_are_distinct_and_ordered_within_a_partition() {
        let a = record_id(0, 5, false, 0);
        assert!(a > 0, "ids are never 0 (0 means none on the wire)");
        assert!(record_id(0, 5, false, 1) > a);
        assert!(record_id(0, 5, true, 0) > record_id(0, 5, false, RECORD_INDEX_LIMIT - 1));
        assert!(record_id(0, 6, false, 0) > record_id(0, 5, true, RECORD_INDEX_LIMIT - 1));
        assert_ne!(record_id(1, 5, false, 0), a);
        assert_eq!(record_id(3, 1 << 39, false, 7), record_id(3, 1 << 39, false, 7));
    }

    /// A record's headers as rdkafka reads them off a consumed record whose
    /// first header's name is not UTF-8: its accessor panics on that one.
    struct NotUtf8First;

    impl Headers for NotUtf8First {
        fn count(&self) -> usize {
            3
        }

        fn try_get(&self, idx: usize) -> Option<Header<'_, &[u8]>> {
            let name: &[u8] = match idx {
                0 => b"r\xffnk",
                1 => b"rank",
                _ => b"other",
            };
            Some(Header {
                key: std::str::from_utf8(name).unwrap(), // as rdkafka does
                value: Some(b"3".as_slice()),
            })
        }
    }

    #[test]
    fn a_header_name_that_is_not_utf8_is_skipped_not_a_crash() {
        assert_eq!(rank_in(&NotUtf8First), Some(3));
        let (payload, headers) = worker_record(7, proto::worker_message::Body::Ack(proto::AdviceAck::default()));
        let record = summaries_record(Some(b"job".as_slice()), Some(&headers), Some(&payload)).unwrap();
        assert_eq!((record.job, record.rank, record.payload), ("job", 7, &payload[..]));
        let record = summaries_record(Some(b"j".as_slice()), Some(&NotUtf8First), None).unwrap();
        assert_eq!((record.rank, record.payload), (3, &[][..]));
        let refused = |key: &'static [u8], headers: Option<&OwnedHeaders>| {
            let (job, r) = summaries_record(Some(key), headers, None).unwrap_err();
            (job, r.reason)
        };
        assert_eq!(refused(b"", Some(&headers)), (None, Reason::EmptyJob));
        assert_eq!(refused(b"\xff", Some(&headers)), (None, Reason::EmptyJob));
        assert_eq!(refused(b"j", None), (Some("j"), Reason::NoRank));
    }

    #[test]
    fn config_section_and_flag() {
        let book = RuleBook::parse_str(
            "[kafka]\nbrokers = \"a:1\"\ngroup = \"g\"\n[kafka.topics]\nadvice = \"adv\"\n[kafka.properties]\n\"socket.timeout.ms\" = \"5000\"\n",
            "t.toml",
        )
        .unwrap();
        let c = KafkaConfig::resolve(&book, None).unwrap().unwrap();
        assert_eq!(c.brokers.as_deref(), Some("a:1"));
        assert_eq!(c.group, "g");
        assert_eq!(c.topics.advice, "adv");
        assert_eq!(c.topics.summaries, "gradguard.summaries");
        assert_eq!(c.properties["socket.timeout.ms"], "5000");
        let c = KafkaConfig::resolve(&book, Some("b:2")).unwrap().unwrap();
        assert_eq!(c.brokers.as_deref(), Some("b:2"));
        assert_eq!(KafkaConfig::resolve(&RuleBook::builtin(), None).unwrap(), None);

        let bad = RuleBook::parse_str("[kafka]\ngroupp = \"g\"\n", "t.toml").unwrap();
        let err = format!("{:#}", KafkaConfig::resolve(&bad, Some("a:1")).unwrap_err());
        assert!(err.contains("groupp"), "{err}");
        let bad = RuleBook::parse_str("[kafka]\npartitions = 0\n", "t.toml").unwrap();
        let err = KafkaConfig::resolve(&bad, Some("a:1")).unwrap_err().to_string();
        assert!(err.contains("kafka.partitions: 0"), "{err}");
    }
}

#[cfg(test)]
mod client_config_tests {
    use super::*;

    /// A `[kafka]` section with SASL over TLS, a tuning property and two
    /// properties the service sets itself.
    fn secured() -> KafkaConfig {
        let book = RuleBook::parse_str(
            "[kafka]\nbrokers = \"k1:9093,k2:9093\"\ngroup = \"g\"\n[kafka.properties]\n\
             \"security.protocol\" = \"SASL_SSL\"\n\"sasl.mechanisms\" = \"SCRAM-SHA-512\"\n\
             \"sasl.username\" = \"gradguard\"\n\"sasl.password\" = \"s3cret\"\n\
             \"ssl.ca.location\" = \"/etc/kafka/ca.crt\"\n\"fetch.wait.max.ms\" = \"100\"\n\
             \"linger.ms\" = \"5\"\n\"group.id\" = \"theirs\"\n\"enable.auto.commit\" = \"true\"\n",
            "t.toml",
        )
        .unwrap();
        KafkaConfig::resolve(&book, None).unwrap().unwrap()
    }

    #[test]
    fn every_client_carries_every_property_and_keeps_its_own_guarantees() {
        let config = secured();
        for client in Client::ALL {
            let c = config.client_config(client);
            assert_eq!(c.get("bootstrap.servers"), Some("k1:9093,k2:9093"), "{client:?}");
            for (k, v) in [
                ("security.protocol", "SASL_SSL"),
                ("sasl.mechanisms", "SCRAM-SHA-512"),
                ("sasl.username", "gradguard"),
                ("sasl.password", "s3cret"),
                ("ssl.ca.location", "/etc/kafka/ca.crt"),
                // Tuning defaults give way to the properties.
                ("fetch.wait.max.ms", "100"),
                ("linger.ms", "5"),
            ] {
                assert_eq!(c.get(k), Some(v), "{client:?}: {k}");
            }
            // A group and commits are the service's, where it has them.
            let (_, required) = client.settings("g");
            for (k, v) in &required {
                assert_eq!(c.get(k), Some(v.as_str()), "{client:?}: {k}");
            }
            if !required.iter().any(|(k, _)| *k == "group.id") {
                assert_eq!(c.get("group.id"), Some("theirs"), "{client:?}");
            }
        }
        let c = config.client_config(Client::DetectorConsumer);
        assert_eq!(c.get("group.id"), Some("g"));
        assert_eq!(c.get("enable.auto.commit"), Some("false"));
        assert_eq!(
            config
                .client_config(Client::StoreFeed { replica: "r1" })
                .get("group.id"),
            Some("g-store-r1")
        );
        assert_eq!(
            config.client_config(Client::Forwarder).get("message.timeout.ms"),
            Some("0")
        );
        assert_eq!(config.overridden_properties(), ["enable.auto.commit", "group.id"]);
    }

    #[test]
    fn without_properties_each_client_gets_its_defaults() {
        let config = KafkaConfig {
            brokers: Some("k:9092".into()),
            ..KafkaConfig::default()
        };
        let forwarder = config.client_config(Client::Forwarder);
        assert_eq!(forwarder.get("queue.buffering.max.kbytes"), Some("65536"));
        assert_eq!(forwarder.get("linger.ms"), Some("2"));
        assert_eq!(forwarder.get("enable.idempotence"), Some("true"));
        let reader = config.client_config(Client::Reader { eof: true });
        assert_eq!(reader.get("fetch.wait.max.ms"), Some("10"));
        assert_eq!(reader.get("enable.partition.eof"), Some("true"));
        assert_eq!(reader.get("group.id"), Some("gradguard-detectors-reader"));
        let admin = config.client_config(Client::Admin);
        assert_eq!(admin.config_map().len(), 1, "{admin:?}");
        assert!(config.overridden_properties().is_empty());
    }

    /// Every librdkafka client configuration in the crate comes from
    /// [`KafkaConfig::client_config`]: nothing else names `ClientConfig`
    /// outside this file, so a new client cannot skip `[kafka.properties]`.
    #[test]
    fn no_client_configuration_is_built_elsewhere() {
        fn walk(dir: &std::path::Path, found: &mut Vec<String>) {
            for entry in std::fs::read_dir(dir).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    walk(&path, found);
                } else if path.extension().is_some_and(|e| e == "rs")
                    && !path.ends_with("cluster/mod.rs")
                    && std::fs::read_to_string(&path).unwrap().contains("ClientConfig")
                {
                    found.push(path.display().to_string());
                }
            }
        }
        let mut found = Vec::new();
        walk(
            &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src"),
            &mut found,
        );
        assert!(
            found.is_empty(),
            "build Kafka clients with KafkaConfig::client_config, not a ClientConfig of their own: {found:?}"
        );
    }
}

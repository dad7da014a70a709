//! Client configuration per role. Every client gets the `[kafka]` section's
//! properties as the user wrote them; changewire's defaults fill only what the user
//! left out, so TLS, SASL and tuning always reach librdkafka.

use changewire_schemas::settings::KafkaConfig;
use rdkafka::ClientConfig;

/// What a client is for; each role has its own defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Publishes records that must land exactly in order, without gaps.
    Producer,
    /// Publishes a source's change stream: a [`Role::Producer`] that waits longer
    /// to fill batches (see [`SOURCE_DEFAULTS`]).
    Source,
    /// Reads records (the caller sets the group and offset handling).
    Consumer,
    /// Creates topics and reads metadata.
    Admin,
}

/// Producer defaults: what makes "acknowledged" mean "stored, in order, no gaps".
const PRODUCER_DEFAULTS: &[(&str, &str)] = &[
    ("enable.idempotence", "true"),
    ("acks", "all"),
    // No delivery timeout: while the broker is down records wait (and the in-flight
    // bound holds the source back) instead of failing and forcing a replay.
    ("message.timeout.ms", "0"),
    ("linger.ms", "5"),
    ("compression.type", "lz4"),
];

/// What a source's producer sets on top of [`PRODUCER_DEFAULTS`]. A live source
/// sends a steady stream, and the broker's CPU goes by produce request far more
/// than by record: over a million live changes tansu spent 4-6 CPU s with a 5 ms
/// linger, 1.5-3.6 s with 10 ms and about 1 s with 50 ms, CPU that PostgreSQL
/// and the producer need on a small machine. 10 ms keeps a change's latency to a
/// consumer under 50 ms at p99; a user who wants throughput over latency sets
/// more in `kafka.properties`. Sinks keep 5 ms: they wait for acknowledgements
/// batch by batch.
pub const SOURCE_DEFAULTS: &[(&str, &str)] = &[("linger.ms", "10")];

/// The client configuration for `role`: the user's properties, then the role's
/// defaults where the user set nothing.
pub fn client_config(config: &KafkaConfig, role: Role) -> ClientConfig {
    let mut client: ClientConfig = config
        .client_properties()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    let defaults: &[&[(&str, &str)]] = match role {
        Role::Source => &[SOURCE_DEFAULTS, PRODUCER_DEFAULTS],
        Role::Producer => &[PRODUCER_DEFAULTS],
        Role::Consumer | Role::Admin => &[],
    };
    for (name, default) in defaults.iter().copied().flatten() {
        if client.get(name).is_none() {
            client.set(*name, *default);
        }
    }
    if matches!(role, Role::Source | Role::Producer) {
        warn_weakened(&client);
    }
    client
}

/// Says so when the user's properties give up ordering or durability.
fn warn_weakened(client: &ClientConfig) {
    if client.get("enable.idempotence") != Some("true") {
        tracing::warn!("kafka.properties sets enable.idempotence to something other than true: a retried batch may be written twice or out of order");
    }
    if !matches!(client.get("acks"), Some("all" | "-1")) {
        tracing::warn!("kafka.properties sets acks to something other than all: an acknowledged record may be lost when a broker fails");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(properties: &[(&str, &str)]) -> KafkaConfig {
        KafkaConfig {
            brokers: "localhost:9092".into(),
            properties: properties
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    #[test]
    fn producer_defaults_fill_only_what_the_user_left_out() {
        let client = client_config(
            &config(&[("linger.ms", "50"), ("message.timeout.ms", "30000")]),
            Role::Producer,
        );
        assert_eq!(client.get("linger.ms"), Some("50"));
        assert_eq!(client.get("message.timeout.ms"), Some("30000"));
        assert_eq!(client.get("enable.idempotence"), Some("true"));
        assert_eq!(client.get("acks"), Some("all"));
        assert_eq!(client.get("bootstrap.servers"), Some("localhost:9092"));
    }

    #[test]
    fn a_source_batches_longer_than_a_sink_unless_the_user_says_otherwise() {
        let source = client_config(&config(&[]), Role::Source);
        assert_eq!(source.get("linger.ms"), Some("10"));
        assert_eq!(source.get("enable.idempotence"), Some("true"));
        let sink = client_config(&config(&[]), Role::Producer);
        assert_eq!(sink.get("linger.ms"), Some("5"));
        let chosen = client_config(&config(&[("linger.ms", "1")]), Role::Source);
        assert_eq!(chosen.get("linger.ms"), Some("1"));
    }

    #[test]
    fn the_user_may_weaken_the_producer() {
        let client = client_config(&config(&[("acks", "1")]), Role::Producer);
        assert_eq!(client.get("acks"), Some("1"));
    }

    #[test]
    fn other_roles_get_the_users_properties_only() {
        let client = client_config(&config(&[("security.protocol", "SASL_SSL")]), Role::Admin);
        assert_eq!(client.get("security.protocol"), Some("SASL_SSL"));
        assert_eq!(client.get("enable.idempotence"), None);
        assert_eq!(client.get("acks"), None);
    }
}

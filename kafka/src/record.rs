//! The one record type: what a part of changewire hands to Kafka.

/// One record to publish, borrowed from its owner: the publisher copies it into
/// librdkafka's queue, so nothing is cloned on the way.
#[derive(Debug, Clone, Copy)]
pub struct Record<'a> {
    /// Destination topic.
    pub topic: &'a str,
    /// The partition, or `None` to partition by key.
    pub partition: Option<i32>,
    /// Message key (entity identity, so one entity's records stay in one partition).
    pub key: Option<&'a [u8]>,
    /// The value; `None` publishes a tombstone.
    pub value: Option<&'a [u8]>,
    /// Message headers, name and value; a header may have no value.
    pub headers: &'a [(&'a str, Option<&'a [u8]>)],
}

impl<'a> Record<'a> {
    /// A record for `topic` partitioned by `key`, without headers.
    pub fn keyed(topic: &'a str, key: Option<&'a [u8]>, value: Option<&'a [u8]>) -> Self {
        Self {
            topic,
            partition: None,
            key,
            value,
            headers: &[],
        }
    }
}

//! Small types (and a helper) every part of the runtime speaks of.

/// A topic and partition.
pub(super) type PartitionKey = (String, i32);

/// A message header: its value may be absent (which is not the same as empty).
pub type Header = (String, Option<Vec<u8>>);

/// Milliseconds since the Unix epoch (0 before it): the origin of a start's,
/// tick's or seal's effects.
pub(super) fn unix_millis(time: std::time::SystemTime) -> u128 {
    time.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis())
}

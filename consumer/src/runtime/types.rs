//! Small types every part of the runtime speaks of.

/// A topic and partition.
pub(super) type PartitionKey = (String, i32);

/// A message header: its value may be absent (which is not the same as empty).
pub type Header = (String, Option<Vec<u8>>);

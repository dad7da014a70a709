//! Big-endian numbers and write lists, shared by the audit's stored parts.

/// `(key, value)` pairs to write.
pub type Writes = Vec<(Vec<u8>, Vec<u8>)>;

/// Reads a big-endian `u64` value (0 when absent or malformed).
pub fn read_u64(value: Option<&[u8]>) -> u64 {
    value
        .and_then(|v| v.try_into().ok())
        .map_or(0, u64::from_be_bytes)
}

//! Decoder for the pgoutput logical decoding plugin's messages, protocol versions 1
//! and 2 (v2 adds streamed in-progress transactions: Stream Start/Stop/Commit/Abort,
//! and an xid on every change sent inside a stream).
//!
//! The format is PostgreSQL's "Logical Replication Message Formats". The decoder is
//! independent of the transport: it takes the payload of one XLogData message.
//! Malformed input gives a [`DecodeError`], never a panic.

use std::fmt;

/// Microseconds between the Unix epoch and PostgreSQL's epoch (2000-01-01).
const PG_EPOCH_OFFSET_MICROS: i64 = 946_684_800_000_000;

/// A log sequence number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Lsn(pub u64);

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xFFFF_FFFF)
    }
}

/// A PostgreSQL timestamp (microseconds since 2000-01-01) as milliseconds since the
/// Unix epoch.
pub fn pg_micros_to_unix_ms(micros: i64) -> i64 {
    micros.saturating_add(PG_EPOCH_OFFSET_MICROS) / 1000
}

/// One decoded pgoutput message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// Start of a (non-streamed) transaction.
    Begin {
        /// LSN of the commit record: known up front, so event ids can use it.
        final_lsn: Lsn,
        /// Commit time, ms since the Unix epoch.
        commit_ms: i64,
        /// Transaction id.
        xid: u32,
    },
    /// End of a transaction.
    Commit(CommitInfo),
    /// Replication origin of the transaction.
    Origin {
        /// LSN of the commit on the origin server.
        lsn: Lsn,
        /// Origin name.
        name: String,
    },
    /// Describes a table; sent before the first change to it (and after DDL).
    Relation(Relation),
    /// Describes a non-built-in type used by a relation.
    Type {
        /// Type OID.
        oid: u32,
        /// Schema of the type.
        namespace: String,
        /// Type name.
        name: String,
    },
    /// A row was inserted.
    Insert {
        /// Table OID.
        relation: u32,
        /// The new row.
        new: Tuple,
    },
    /// A row was updated.
    Update {
        /// Table OID.
        relation: u32,
        /// The old row: its key columns (`K`) or every column with REPLICA IDENTITY
        /// FULL (`O`); `None` when the key did not change and identity is not FULL.
        old: Option<OldTuple>,
        /// The new row.
        new: Tuple,
    },
    /// A row was deleted.
    Delete {
        /// Table OID.
        relation: u32,
        /// The old row (key columns or the full row).
        old: OldTuple,
    },
    /// Tables were truncated.
    Truncate {
        /// Table OIDs.
        relations: Vec<u32>,
        /// `TRUNCATE ... CASCADE`.
        cascade: bool,
        /// `TRUNCATE ... RESTART IDENTITY`.
        restart_identity: bool,
    },
    /// A generic logical message (`pg_logical_emit_message`).
    Logical {
        /// Whether it was emitted transactionally.
        transactional: bool,
        /// LSN of the message.
        lsn: Lsn,
        /// Prefix given by the emitter.
        prefix: String,
        /// Content.
        content: Vec<u8>,
    },
    /// Start of a block of changes of an in-progress transaction (v2).
    StreamStart {
        /// Transaction id.
        xid: u32,
        /// The first block of this transaction.
        first_segment: bool,
    },
    /// End of a block of streamed changes (v2).
    StreamStop,
    /// A streamed transaction committed (v2).
    StreamCommit {
        /// Transaction id.
        xid: u32,
        /// Where and when it committed.
        commit: CommitInfo,
    },
    /// A streamed (sub)transaction aborted (v2): discard its changes.
    StreamAbort {
        /// Top-level transaction id.
        xid: u32,
        /// Aborted subtransaction id (equal to `xid` when the whole transaction aborted).
        subxid: u32,
    },
}

/// Where and when a transaction committed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CommitInfo {
    /// LSN of the commit record.
    pub commit_lsn: Lsn,
    /// LSN just past the commit record: the position to confirm once published.
    pub end_lsn: Lsn,
    /// Commit time, ms since the Unix epoch.
    pub commit_ms: i64,
}

/// Which old row an update or delete carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OldTuple {
    /// Only the replica-identity key columns (others are null).
    Key(Tuple),
    /// Every column (REPLICA IDENTITY FULL).
    Full(Tuple),
}

/// A table as pgoutput describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relation {
    /// Table OID.
    pub oid: u32,
    /// Schema name.
    pub namespace: String,
    /// Table name.
    pub name: String,
    /// REPLICA IDENTITY setting: `d` default, `n` nothing, `f` full, `i` index.
    pub replica_identity: u8,
    /// Columns in order.
    pub columns: Vec<Column>,
}

/// One column of a [`Relation`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    /// Part of the replica identity key.
    pub is_key: bool,
    /// Column name.
    pub name: String,
    /// Type OID.
    pub type_oid: u32,
    /// Type modifier (e.g. varchar length), -1 when none.
    pub type_modifier: i32,
}

impl Column {
    /// A column of type `type_oid` without a type modifier, as tests and benchmarks
    /// describe tables.
    pub fn new(name: &str, type_oid: u32, is_key: bool) -> Self {
        Self {
            is_key,
            name: name.to_owned(),
            type_oid,
            type_modifier: -1,
        }
    }
}

/// Column values of one row, in relation order.
pub type Tuple = Vec<Value>;

/// One column value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    /// SQL NULL.
    Null,
    /// A TOASTed value that did not change and was not sent.
    UnchangedToast,
    /// Text representation.
    Text(String),
    /// Binary representation (only with the `binary` option).
    Binary(Vec<u8>),
}

/// A pgoutput payload that could not be decoded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    /// The payload ended before the message did.
    #[error("pgoutput message {tag:?} is truncated")]
    Truncated {
        /// Message tag.
        tag: char,
    },
    /// A tag this decoder does not know.
    #[error("unknown pgoutput message tag {0:?}")]
    UnknownTag(char),
    /// A known message with an invalid field.
    #[error("pgoutput message {tag:?} is malformed: {reason}")]
    Malformed {
        /// Message tag.
        tag: char,
        /// What is wrong.
        reason: &'static str,
    },
    /// The payload was empty.
    #[error("empty pgoutput message")]
    Empty,
}

/// Decodes a stream of pgoutput messages, tracking whether changes arrive inside a
/// streamed block (where they carry an xid).
#[derive(Debug, Default)]
pub struct Decoder {
    streaming_xid: Option<u32>,
}

impl Decoder {
    /// A decoder at the start of a replication stream.
    pub fn new() -> Self {
        Self::default()
    }

    /// The transaction whose streamed block is open, if any. Changes decoded while
    /// this is `Some` belong to that in-progress transaction.
    pub fn streaming_xid(&self) -> Option<u32> {
        self.streaming_xid
    }

    /// Decodes one message.
    pub fn decode(&mut self, payload: &[u8]) -> Result<Message, DecodeError> {
        let (&tag, body) = payload.split_first().ok_or(DecodeError::Empty)?;
        let tag = char::from(tag);
        let mut r = Reader { bytes: body, tag };
        let message = self.decode_body(tag, &mut r)?;
        if !r.bytes.is_empty() {
            return Err(r.malformed("trailing bytes"));
        }
        Ok(message)
    }

    fn decode_body(&mut self, tag: char, r: &mut Reader<'_>) -> Result<Message, DecodeError> {
        // Inside a streamed block every change-related message starts with the xid.
        if self.streaming_xid.is_some() && "RYIUDTM".contains(tag) {
            r.u32()?;
        }
        Ok(match tag {
            'B' => Message::Begin {
                final_lsn: r.lsn()?,
                commit_ms: pg_micros_to_unix_ms(r.i64()?),
                xid: r.u32()?,
            },
            'C' => Message::Commit(r.commit_info()?),
            'O' => Message::Origin {
                lsn: r.lsn()?,
                name: r.string()?,
            },
            'R' => Message::Relation(r.relation()?),
            'Y' => Message::Type {
                oid: r.u32()?,
                namespace: r.string()?,
                name: r.string()?,
            },
            'I' => {
                let relation = r.u32()?;
                r.expect(b'N')?;
                Message::Insert {
                    relation,
                    new: r.tuple()?,
                }
            }
            'U' => r.update()?,
            'D' => {
                let relation = r.u32()?;
                let old = r.old_tuple()?;
                Message::Delete { relation, old }
            }
            'T' => r.truncate()?,
            'M' => {
                let transactional = r.u8()? & 1 == 1;
                let lsn = r.lsn()?;
                let prefix = r.string()?;
                let len = r.len()?;
                Message::Logical {
                    transactional,
                    lsn,
                    prefix,
                    content: r.take(len)?.to_vec(),
                }
            }
            'S' => {
                let xid = r.u32()?;
                self.streaming_xid = Some(xid);
                Message::StreamStart {
                    xid,
                    first_segment: r.u8()? == 1,
                }
            }
            'E' => {
                self.streaming_xid = None;
                Message::StreamStop
            }
            'c' => Message::StreamCommit {
                xid: r.u32()?,
                commit: r.commit_info()?,
            },
            'A' => Message::StreamAbort {
                xid: r.u32()?,
                subxid: r.u32()?,
            },
            other => return Err(DecodeError::UnknownTag(other)),
        })
    }
}

/// A cursor over one message body.
struct Reader<'a> {
    bytes: &'a [u8],
    tag: char,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.bytes.len() < n {
            return Err(DecodeError::Truncated { tag: self.tag });
        }
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let mut out = [0; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    fn malformed(&self, reason: &'static str) -> DecodeError {
        DecodeError::Malformed {
            tag: self.tag,
            reason,
        }
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, DecodeError> {
        Ok(u16::from_be_bytes(self.array()?))
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    fn i32(&mut self) -> Result<i32, DecodeError> {
        Ok(i32::from_be_bytes(self.array()?))
    }

    fn i64(&mut self) -> Result<i64, DecodeError> {
        Ok(i64::from_be_bytes(self.array()?))
    }

    fn lsn(&mut self) -> Result<Lsn, DecodeError> {
        Ok(Lsn(u64::from_be_bytes(self.array()?)))
    }

    /// A non-negative Int32 length.
    fn len(&mut self) -> Result<usize, DecodeError> {
        usize::try_from(self.i32()?).map_err(|_| self.malformed("negative length"))
    }

    fn expect(&mut self, byte: u8) -> Result<(), DecodeError> {
        if self.u8()? != byte {
            return Err(self.malformed("unexpected tuple marker"));
        }
        Ok(())
    }

    /// A NUL-terminated UTF-8 string.
    fn string(&mut self) -> Result<String, DecodeError> {
        let end = self
            .bytes
            .iter()
            .position(|&b| b == 0)
            .ok_or(DecodeError::Truncated { tag: self.tag })?;
        let text = std::str::from_utf8(&self.bytes[..end])
            .map_err(|_| self.malformed("string is not UTF-8"))?
            .to_owned();
        self.bytes = &self.bytes[end + 1..];
        Ok(text)
    }

    fn commit_info(&mut self) -> Result<CommitInfo, DecodeError> {
        self.u8()?; // flags, unused by every protocol version so far
        Ok(CommitInfo {
            commit_lsn: self.lsn()?,
            end_lsn: self.lsn()?,
            commit_ms: pg_micros_to_unix_ms(self.i64()?),
        })
    }

    fn relation(&mut self) -> Result<Relation, DecodeError> {
        let oid = self.u32()?;
        let namespace = self.string()?;
        let name = self.string()?;
        let replica_identity = self.u8()?;
        let count = self.u16()?;
        let columns = (0..count)
            .map(|_| {
                Ok(Column {
                    is_key: self.u8()? & 1 == 1,
                    name: self.string()?,
                    type_oid: self.u32()?,
                    type_modifier: self.i32()?,
                })
            })
            .collect::<Result<_, DecodeError>>()?;
        Ok(Relation {
            oid,
            namespace,
            name,
            replica_identity,
            columns,
        })
    }

    fn tuple(&mut self) -> Result<Tuple, DecodeError> {
        let count = self.u16()?;
        (0..count).map(|_| self.value()).collect()
    }

    fn value(&mut self) -> Result<Value, DecodeError> {
        Ok(match self.u8()? {
            b'n' => Value::Null,
            b'u' => Value::UnchangedToast,
            b't' => {
                let len = self.len()?;
                let bytes = self.take(len)?;
                let text = std::str::from_utf8(bytes)
                    .map_err(|_| self.malformed("text value is not UTF-8"))?;
                Value::Text(text.to_owned())
            }
            b'b' => {
                let len = self.len()?;
                Value::Binary(self.take(len)?.to_vec())
            }
            _ => return Err(self.malformed("unknown column value kind")),
        })
    }

    fn old_tuple(&mut self) -> Result<OldTuple, DecodeError> {
        match self.u8()? {
            b'K' => Ok(OldTuple::Key(self.tuple()?)),
            b'O' => Ok(OldTuple::Full(self.tuple()?)),
            _ => Err(self.malformed("expected old tuple marker K or O")),
        }
    }

    fn update(&mut self) -> Result<Message, DecodeError> {
        let relation = self.u32()?;
        let old = match self.bytes.first() {
            Some(b'K' | b'O') => Some(self.old_tuple()?),
            _ => None,
        };
        self.expect(b'N')?;
        Ok(Message::Update {
            relation,
            old,
            new: self.tuple()?,
        })
    }

    fn truncate(&mut self) -> Result<Message, DecodeError> {
        let count = self.u32()?;
        let options = self.u8()?;
        // Bound the allocation by what the payload can hold, not by the claimed count.
        if self.bytes.len() / 4 < count as usize {
            return Err(DecodeError::Truncated { tag: self.tag });
        }
        let relations = (0..count).map(|_| self.u32()).collect::<Result<_, _>>()?;
        Ok(Message::Truncate {
            relations,
            cascade: options & 1 == 1,
            restart_identity: options & 2 == 2,
        })
    }
}

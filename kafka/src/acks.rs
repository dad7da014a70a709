//! Which records of one lane are acknowledged: records get consecutive sequence
//! numbers, acknowledgements arrive in any order (partitions are independent), and
//! the *watermark* is the first sequence number not yet acknowledged, so every record
//! below it is durably stored.

use std::collections::VecDeque;

/// The acknowledgement state of one lane. Pure; the publisher wraps it in a lock.
#[derive(Debug, Default)]
pub(crate) struct Acks {
    /// Every sequence number below this one is acknowledged.
    watermark: u64,
    /// From `watermark` on: whether each was acknowledged (out of order).
    ahead: VecDeque<bool>,
}

impl Acks {
    /// Records that `seq` was acknowledged. Returns whether the watermark moved.
    pub(crate) fn acknowledge(&mut self, seq: u64) -> bool {
        let Some(index) = seq.checked_sub(self.watermark) else {
            return false;
        };
        let index = index as usize;
        if self.ahead.len() <= index {
            self.ahead.resize(index + 1, false);
        }
        self.ahead[index] = true;
        let before = self.watermark;
        while self.ahead.front() == Some(&true) {
            self.ahead.pop_front();
            self.watermark += 1;
        }
        self.watermark != before
    }

    /// The first sequence number not yet acknowledged.
    pub(crate) fn watermark(&self) -> u64 {
        self.watermark
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_watermark_waits_for_the_oldest_record() {
        let mut acks = Acks::default();
        assert!(!acks.acknowledge(1));
        assert!(!acks.acknowledge(2));
        assert_eq!(acks.watermark(), 0);
        assert!(acks.acknowledge(0));
        assert_eq!(acks.watermark(), 3);
    }

    #[test]
    fn a_repeated_or_old_acknowledgement_changes_nothing() {
        let mut acks = Acks::default();
        assert!(acks.acknowledge(0));
        assert!(!acks.acknowledge(0));
        assert_eq!(acks.watermark(), 1);
    }

    #[test]
    fn any_order_ends_at_the_count() {
        let mut acks = Acks::default();
        let order = [5u64, 3, 9, 0, 1, 2, 8, 7, 4, 6];
        for (i, seq) in order.iter().enumerate() {
            acks.acknowledge(*seq);
            let expected = (0..10u64).find(|s| !order[..=i].contains(s)).unwrap_or(10);
            assert_eq!(acks.watermark(), expected, "after {:?}", &order[..=i]);
        }
    }
}

//! Poisoned deliveries: AMQP short strings that are not UTF-8, found and repaired before lapin
//! parses the frame.
//!
//! lapin refuses any AMQP short string that is not UTF-8 — a routing key, an exchange name, a
//! `message_id`, a header's key — and fails the whole connection over it, with the message
//! still in the queue: a worker would reconnect straight back into it, forever. php-amqplib
//! publishes such messages without complaint. Here each such byte is replaced by `?` in place
//! (same length, so the frame is untouched otherwise) and the delivery is logged as poisoned;
//! the consumer then dead-letters it (the broker's copy still has the original bytes) instead
//! of handing a mangled message to the application.
//!
//! Only method and content-header frames are held until complete and checked; bodies pass
//! straight through. The socket wrapper that runs the scanner is in `transport.rs`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// Deliveries whose short strings were not UTF-8, by (channel, delivery tag).
#[derive(Debug, Default)]
pub(crate) struct PoisonLog {
    /// Entries in `entries`: lets the common case skip the lock.
    count: AtomicUsize,
    entries: Mutex<HashMap<(u16, u64), Vec<&'static str>>>,
}

impl PoisonLog {
    fn record(&self, channel: u16, tag: u64, fields: &[&'static str]) {
        let Ok(mut entries) = self.entries.lock() else {
            return;
        };
        let known = entries.entry((channel, tag)).or_default();
        for field in fields {
            if !known.contains(field) {
                known.push(field);
            }
        }
        self.count.store(entries.len(), Ordering::Release);
    }

    /// The fields of this delivery that were not UTF-8 (replaced by `?`), if any; once.
    pub(crate) fn take(&self, channel: u16, tag: u64) -> Option<Vec<&'static str>> {
        if self.count.load(Ordering::Acquire) == 0 {
            return None;
        }
        let mut entries = self.entries.lock().ok()?;
        let fields = entries.remove(&(channel, tag));
        self.count.store(entries.len(), Ordering::Release);
        fields
    }

    /// A reopened channel starts its delivery tags at 1 again.
    fn forget_channel(&self, channel: u16) {
        if self.count.load(Ordering::Acquire) == 0 {
            return;
        }
        if let Ok(mut entries) = self.entries.lock() {
            entries.retain(|(c, _), _| *c != channel);
            self.count.store(entries.len(), Ordering::Release);
        }
    }
}

/// Frames above this are passed on unchecked rather than buffered whole (no broker sends
/// method or header frames anywhere near it; frame_max is 128 KiB by default).
const MAX_HELD_FRAME: usize = 4 << 20;

const FRAME_METHOD: u8 = 1;
const FRAME_HEADER: u8 = 2;

/// Basic properties that are short strings, by flag bit (the table is bit 13).
const SHORTSTR_PROPERTIES: [(u16, &str); 10] = [
    (15, "content_type"),
    (14, "content_encoding"),
    (10, "correlation_id"),
    (9, "reply_to"),
    (8, "expiration"),
    (7, "message_id"),
    (5, "type"),
    (4, "user_id"),
    (3, "app_id"),
    (2, "cluster_id"),
];

/// Walks the frames the broker sends, repairing short strings in deliveries.
#[derive(Debug)]
pub(crate) struct Scanner {
    log: Arc<PoisonLog>,
    /// Bytes of the current frame still to pass unchecked.
    pass: usize,
    /// Per channel, the delivery tag of the last deliver/get-ok (None after a return): the
    /// content header that follows belongs to it.
    delivery: HashMap<u16, Option<u64>>,
}

impl Scanner {
    pub(crate) fn new(log: Arc<PoisonLog>) -> Self {
        Self {
            log,
            pass: 0,
            delivery: HashMap::new(),
        }
    }

    /// Checks the frames at the start of `buf`; returns how many bytes may go on to lapin (an
    /// incomplete method or header frame at the end waits for the rest).
    pub(crate) fn scan(&mut self, buf: &mut [u8]) -> usize {
        let mut pos = 0;
        loop {
            if self.pass > 0 {
                let n = self.pass.min(buf.len() - pos);
                pos += n;
                self.pass -= n;
                if self.pass > 0 {
                    return pos;
                }
            }
            let Some(head) = buf.get(pos..pos + 7) else {
                return pos;
            };
            let kind = head[0];
            let channel = u16::from_be_bytes([head[1], head[2]]);
            let size = u32::from_be_bytes([head[3], head[4], head[5], head[6]]) as usize;
            let total = size.saturating_add(8);
            if !matches!(kind, FRAME_METHOD | FRAME_HEADER) || size > MAX_HELD_FRAME {
                // A body, a heartbeat, or not a frame at all (a protocol header): not ours.
                self.pass = total;
                continue;
            }
            if buf.len() - pos < total {
                return pos;
            }
            let payload = &mut buf[pos + 7..pos + 7 + size];
            // A frame we cannot make sense of is left alone: lapin will say what is wrong.
            let _ = if kind == FRAME_METHOD {
                self.method(channel, payload)
            } else {
                self.header(channel, payload)
            };
            pos += total;
        }
    }

    fn method(&mut self, channel: u16, payload: &mut [u8]) -> Option<()> {
        let mut c = Cursor::new(payload);
        let ids = (c.u16()?, c.u16()?);
        let mut bad = Vec::new();
        match ids {
            // basic.deliver: consumer tag, delivery tag, redelivered, exchange, routing key.
            (60, 60) => {
                c.shortstr("consumer tag", &mut bad)?;
                let tag = c.u64()?;
                c.skip(1)?;
                c.shortstr("exchange", &mut bad)?;
                c.shortstr("routing key", &mut bad)?;
                self.delivered(channel, Some(tag), &bad);
            }
            // basic.get-ok: delivery tag, redelivered, exchange, routing key, message count.
            (60, 71) => {
                let tag = c.u64()?;
                c.skip(1)?;
                c.shortstr("exchange", &mut bad)?;
                c.shortstr("routing key", &mut bad)?;
                self.delivered(channel, Some(tag), &bad);
            }
            // basic.return: reply code, reply text, exchange, routing key. Only reported back
            // to the publisher as a failure, so `?` in its names is all that is needed.
            (60, 50) => {
                c.skip(2)?;
                c.shortstr("reply text", &mut bad)?;
                c.shortstr("exchange", &mut bad)?;
                c.shortstr("routing key", &mut bad)?;
                self.delivered(channel, None, &bad);
            }
            // channel.open-ok: a new channel under a number that may have been used before.
            (20, 11) => {
                self.delivery.remove(&channel);
                self.log.forget_channel(channel);
            }
            _ => {}
        }
        Some(())
    }

    fn delivered(&mut self, channel: u16, tag: Option<u64>, bad: &[&'static str]) {
        self.delivery.insert(channel, tag);
        if let (Some(tag), false) = (tag, bad.is_empty()) {
            self.log.record(channel, tag, bad);
        }
    }

    pub(crate) fn header(&mut self, channel: u16, payload: &mut [u8]) -> Option<()> {
        let mut c = Cursor::new(payload);
        // class, weight, body size
        c.skip(12)?;
        let flags = c.u16()?;
        if flags & 1 != 0 {
            return None; // continued flags: not basic's
        }
        let mut bad = Vec::new();
        for bit in (2..=15).rev() {
            if flags & (1 << bit) == 0 {
                continue;
            }
            match bit {
                13 => c.table(&mut bad)?,
                12 | 11 => c.skip(1)?,
                6 => c.skip(8)?,
                _ => {
                    let name = SHORTSTR_PROPERTIES
                        .iter()
                        .find(|(b, _)| *b == bit)
                        .map_or("property", |(_, name)| name);
                    c.shortstr(name, &mut bad)?;
                }
            }
        }
        if let (Some(Some(tag)), false) = (self.delivery.get(&channel), bad.is_empty()) {
            self.log.record(channel, *tag, &bad);
        }
        Some(())
    }
}

/// Reads AMQP fields in place; `None` once past the end.
struct Cursor<'a> {
    buf: &'a mut [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn new(buf: &'a mut [u8]) -> Self {
        Self { buf, pos: 0 }
    }

    fn take(&mut self, n: usize) -> Option<&mut [u8]> {
        let end = self.pos.checked_add(n)?;
        let bytes = self.buf.get_mut(self.pos..end)?;
        self.pos = end;
        Some(bytes)
    }

    fn skip(&mut self, n: usize) -> Option<()> {
        self.take(n).map(|_| ())
    }

    fn u8(&mut self) -> Option<u8> {
        Some(self.take(1)?[0])
    }

    fn u16(&mut self) -> Option<u16> {
        let b = self.take(2)?;
        Some(u16::from_be_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> Option<usize> {
        let b = self.take(4)?;
        Some(u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize)
    }

    fn u64(&mut self) -> Option<u64> {
        let b = self.take(8)?;
        let mut bytes = [0; 8];
        bytes.copy_from_slice(b);
        Some(u64::from_be_bytes(bytes))
    }

    /// A short string, repaired in place; its name goes to `bad` if it needed it.
    fn shortstr(&mut self, name: &'static str, bad: &mut Vec<&'static str>) -> Option<()> {
        let len = usize::from(self.u8()?);
        if repair_utf8(self.take(len)?) && !bad.contains(&name) {
            bad.push(name);
        }
        Some(())
    }

    /// A field table: its keys are short strings, at any depth.
    fn table(&mut self, bad: &mut Vec<&'static str>) -> Option<()> {
        let len = self.u32()?;
        let end = self.pos.checked_add(len)?;
        while self.pos < end {
            self.shortstr("header key", bad)?;
            self.value(bad)?;
        }
        (self.pos == end).then_some(())
    }

    /// One typed field value, as RabbitMQ writes them (and lapin reads them).
    fn value(&mut self, bad: &mut Vec<&'static str>) -> Option<()> {
        match self.u8()? {
            b'V' => Some(()),
            b't' | b'b' | b'B' => self.skip(1),
            b's' | b'U' | b'u' => self.skip(2),
            b'I' | b'i' | b'f' => self.skip(4),
            b'D' => self.skip(5),
            b'L' | b'l' | b'd' | b'T' => self.skip(8),
            b'S' | b'x' => {
                let len = self.u32()?;
                self.skip(len)
            }
            b'A' => {
                let len = self.u32()?;
                let end = self.pos.checked_add(len)?;
                while self.pos < end {
                    self.value(bad)?;
                }
                (self.pos == end).then_some(())
            }
            b'F' => self.table(bad),
            _ => None,
        }
    }
}

/// Replaces every byte of each invalid UTF-8 sequence by `?`; true if there was one.
fn repair_utf8(bytes: &mut [u8]) -> bool {
    let mut from = 0;
    let mut repaired = false;
    while let Err(err) = std::str::from_utf8(&bytes[from..]) {
        let start = from + err.valid_up_to();
        let end = err.error_len().map_or(bytes.len(), |n| start + n);
        bytes[start..end].fill(b'?');
        repaired = true;
        from = end;
    }
    repaired
}

/// The fate of a poisoned delivery that was not auto-acked.
pub(crate) const DEAD_LETTERED: &str =
    "rejected without requeue, so the broker dead-letters it if the \
                             queue has a dead-letter exchange (and drops it if not)";

/// What to tell the user about a delivery whose short strings were not UTF-8.
pub(crate) fn poison_warning(
    fields: &[&str],
    tag: u64,
    queue: &str,
    endpoint: &str,
    fate: &str,
) -> String {
    format!(
        "delivery {tag} from queue '{queue}' on {endpoint} not handed to the application: its {} \
         not valid UTF-8, which AMQP requires of short strings; {fate}",
        match fields {
            [one] => format!("{one} is"),
            _ => format!("{} are", fields.join(", ")),
        }
    )
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn frame(kind: u8, channel: u16, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![kind];
        f.extend_from_slice(&channel.to_be_bytes());
        f.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        f.extend_from_slice(payload);
        f.push(0xCE);
        f
    }

    pub(crate) fn short(s: &[u8]) -> Vec<u8> {
        let mut v = vec![s.len() as u8];
        v.extend_from_slice(s);
        v
    }

    pub(crate) fn deliver(tag: u64, routing_key: &[u8]) -> Vec<u8> {
        let mut p = vec![0, 60, 0, 60];
        p.extend(short(b"ctag"));
        p.extend_from_slice(&tag.to_be_bytes());
        p.push(0);
        p.extend(short(b"ex"));
        p.extend(short(routing_key));
        frame(FRAME_METHOD, 1, &p)
    }

    /// A header with message_id and a table { "k": { <inner>: "v" } }.
    pub(crate) fn header(message_id: &[u8], inner_key: &[u8]) -> Vec<u8> {
        let mut inner = short(inner_key);
        inner.push(b'S');
        inner.extend_from_slice(&1u32.to_be_bytes());
        inner.push(b'v');
        let mut table = short(b"k");
        table.push(b'F');
        table.extend_from_slice(&(inner.len() as u32).to_be_bytes());
        table.extend(inner);
        let mut p = vec![0, 60, 0, 0];
        p.extend_from_slice(&3u64.to_be_bytes());
        p.extend_from_slice(&((1u16 << 13) | (1 << 7)).to_be_bytes());
        p.extend_from_slice(&(table.len() as u32).to_be_bytes());
        p.extend(table);
        p.extend(short(message_id));
        frame(FRAME_HEADER, 1, &p)
    }

    #[test]
    fn invalid_utf8_is_replaced_in_place_and_the_delivery_logged() {
        let log = Arc::new(PoisonLog::default());
        let mut scanner = Scanner::new(log.clone());
        let mut wire = [
            deliver(7, b"rk\xff"),
            header(b"\xff\xfeid", b"\xc3\x28"),
            frame(3, 1, b"abc"),
            deliver(8, b"fine"),
            header(b"id", b"ok"),
        ]
        .concat();
        let len = wire.len();
        assert_eq!(scanner.scan(&mut wire), len);
        assert!(
            std::str::from_utf8(&wire).is_err(),
            "only short strings are touched"
        );
        let text = String::from_utf8_lossy(&wire);
        for repaired in ["rk?", "??id", "?("] {
            assert!(text.contains(repaired), "{repaired} in {text:?}");
        }
        assert_eq!(
            log.take(1, 7),
            Some(vec!["routing key", "header key", "message_id"])
        );
        assert_eq!(log.take(1, 7), None, "taken once");
        assert_eq!(log.take(1, 8), None);
    }

    #[test]
    fn an_incomplete_frame_waits_and_bodies_pass_in_pieces() {
        let log = Arc::new(PoisonLog::default());
        let mut scanner = Scanner::new(log.clone());
        let body = frame(3, 1, &[0xff; 100]);
        let mut wire = [deliver(1, b"\xff"), body.clone()].concat();
        let first = deliver(1, b"\xff").len();
        // A method frame cut short is held back whole.
        assert_eq!(scanner.scan(&mut wire[..first - 1]), 0);
        // A body is let through as it comes.
        assert_eq!(scanner.scan(&mut wire[..first + 10]), first + 10);
        let rest = &mut wire[first + 10..];
        assert_eq!(scanner.scan(rest), rest.len());
        assert_eq!(&wire[first..], &body[..], "bodies are never changed");
        assert_eq!(log.take(1, 1), Some(vec!["routing key"]));
    }

    #[test]
    fn a_reopened_channel_forgets_its_old_tags() {
        let log = Arc::new(PoisonLog::default());
        let mut scanner = Scanner::new(log.clone());
        let mut wire = [
            deliver(1, b"\xff"),
            frame(FRAME_METHOD, 1, &[0, 20, 0, 11, 0, 0, 0, 0]),
        ]
        .concat();
        let len = wire.len();
        assert_eq!(scanner.scan(&mut wire), len);
        assert_eq!(log.take(1, 1), None);
    }

    #[test]
    fn repair_keeps_valid_characters() {
        let mut s = "é\u{1F600}".as_bytes().to_vec();
        s.insert(2, 0x80);
        s.push(0xf0);
        assert!(repair_utf8(&mut s));
        assert_eq!(std::str::from_utf8(&s).ok(), Some("é?\u{1F600}?"));
        let mut fine = b"plain".to_vec();
        assert!(!repair_utf8(&mut fine));
    }
}

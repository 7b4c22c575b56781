//! Encoded sizes of AMQP content headers, to refuse locally what the broker would answer with
//! a connection-closing FRAME_ERROR: a content header (properties and headers) must fit in
//! one frame of the negotiated `frame_max`.

use lapin::types::{AMQPValue, FieldTable};
use lapin::BasicProperties;

/// Frame overhead (type, channel, size, end) plus the content header's fixed fields
/// (class, weight, body size, property flags).
const HEADER_FRAME_OVERHEAD: usize = 8 + 2 + 2 + 8 + 2;

fn table_size(table: &FieldTable) -> usize {
    4 + table
        .inner()
        .iter()
        .map(|(k, v)| 1 + k.as_str().len() + 1 + value_size(v))
        .sum::<usize>()
}

fn value_size(value: &AMQPValue) -> usize {
    match value {
        AMQPValue::Boolean(_) | AMQPValue::ShortShortInt(_) | AMQPValue::ShortShortUInt(_) => 1,
        AMQPValue::ShortInt(_) | AMQPValue::ShortUInt(_) => 2,
        AMQPValue::LongInt(_) | AMQPValue::LongUInt(_) | AMQPValue::Float(_) => 4,
        AMQPValue::LongLongInt(_) | AMQPValue::Double(_) | AMQPValue::Timestamp(_) => 8,
        AMQPValue::DecimalValue(_) => 5,
        AMQPValue::ShortString(s) => 1 + s.as_str().len(),
        AMQPValue::LongString(s) => 4 + s.as_bytes().len(),
        AMQPValue::ByteArray(b) => 4 + b.as_slice().len(),
        AMQPValue::FieldArray(a) => {
            4 + a
                .as_slice()
                .iter()
                .map(|v| 1 + value_size(v))
                .sum::<usize>()
        }
        AMQPValue::FieldTable(t) => table_size(t),
        AMQPValue::Void => 0,
    }
}

/// Bytes the content header frame of a message with `properties` takes on the wire.
pub fn content_header_size(properties: &BasicProperties) -> usize {
    let short =
        |s: &Option<lapin::types::ShortString>| s.as_ref().map_or(0, |s| 1 + s.as_str().len());
    HEADER_FRAME_OVERHEAD
        + short(properties.content_type())
        + short(properties.content_encoding())
        + properties.headers().as_ref().map_or(0, table_size)
        + properties.delivery_mode().map_or(0, |_| 1)
        + properties.priority().map_or(0, |_| 1)
        + short(properties.correlation_id())
        + short(properties.reply_to())
        + short(properties.expiration())
        + short(properties.message_id())
        + properties.timestamp().map_or(0, |_| 8)
        + short(properties.kind())
        + short(properties.user_id())
        + short(properties.app_id())
        + short(properties.cluster_id())
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::types::{FieldArray, LongString, ShortString};

    #[test]
    fn counts_nested_tables_and_arrays_as_the_wire_does() {
        let mut inner = FieldTable::default();
        inner.insert(ShortString::from("k"), AMQPValue::LongLongInt(1));
        let mut headers = FieldTable::default();
        headers.insert(ShortString::from("t"), AMQPValue::FieldTable(inner));
        headers.insert(
            ShortString::from("a"),
            AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::Boolean(true)])),
        );
        headers.insert(
            ShortString::from("s"),
            AMQPValue::LongString(LongString::from(b"abc".to_vec())),
        );
        // table 4 + t(1+1+1 + (4 + 1+1+1+8)) + a(1+1+1 + (4 + 1+1)) + s(1+1+1 + 4+3)
        assert_eq!(table_size(&headers), 4 + 18 + 9 + 10);
        let props = BasicProperties::default()
            .with_headers(headers)
            .with_delivery_mode(2);
        assert_eq!(content_header_size(&props), HEADER_FRAME_OVERHEAD + 41 + 1);
    }
}

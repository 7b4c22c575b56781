//! Every conversion from PHP values: option arrays, and PHP arrays to AMQP field tables.

use crate::php::exceptions::{invalid_argument, type_error};
use ext_php_rs::convert::{FromZval, StubLiteral};
use ext_php_rs::exception::PhpResult;
use ext_php_rs::flags::DataType;
use ext_php_rs::types::{ArrayKey, ZendHashTable, Zval};
use lapin::types::{AMQPValue, FieldArray, FieldTable, LongString, ShortString};
use std::time::Duration;

/// An `array $x = []` parameter: a borrowed PHP array, or none when the caller omitted it.
///
/// ext-php-rs cannot default a `&ZendHashTable` parameter; this type gives Reflection the
/// `array` type with the `[]` default the contract promises.
#[derive(Clone, Copy, Default)]
pub struct PhpArray<'a>(Option<&'a ZendHashTable>);

impl PhpArray<'_> {
    /// The omitted-argument value, `[]`.
    pub const EMPTY: PhpArray<'static> = PhpArray(None);

    /// The array's entries, none when omitted.
    pub fn table(&self) -> Option<&ZendHashTable> {
        self.0
    }
}

impl<'a> FromZval<'a> for PhpArray<'a> {
    const TYPE: DataType = DataType::Array;

    fn from_zval(zval: &'a Zval) -> Option<Self> {
        zval.array().map(|a| PhpArray(Some(a)))
    }
}

impl StubLiteral for PhpArray<'_> {
    fn stub_literal(&self) -> String {
        "[]".to_string()
    }
}

/// The PHP type name of a value, as PHP's own TypeErrors spell it.
pub fn type_name(zval: &Zval) -> &'static str {
    let zval = zval.dereference();
    if zval.is_null() {
        "null"
    } else if zval.is_bool() {
        "bool"
    } else if zval.is_long() {
        "int"
    } else if zval.is_double() {
        "float"
    } else if zval.is_string() {
        "string"
    } else if zval.is_array() {
        "array"
    } else if zval.is_object() {
        "object"
    } else if zval.is_resource() {
        "resource"
    } else {
        "unknown"
    }
}

fn key_name(key: &ArrayKey<'_>) -> String {
    match key {
        ArrayKey::Long(i) => i.to_string(),
        ArrayKey::String(s) => s.clone(),
        ArrayKey::Str(s) => (*s).to_string(),
        ArrayKey::ZendString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
    }
}

/// Reads an options array: rejects unknown keys up front, then hands out typed values.
pub struct Options<'a> {
    entries: Vec<(String, &'a Zval)>,
    context: &'a str,
}

impl<'a> Options<'a> {
    /// Checks every key of `array` against `allowed`; `context` names the call in errors
    /// ("Connection options").
    pub fn new(
        array: Option<&'a ZendHashTable>,
        allowed: &[&str],
        context: &'a str,
    ) -> PhpResult<Self> {
        let mut entries = Vec::new();
        if let Some(array) = array {
            for (key, value) in array.iter() {
                let name = key_name(&key);
                if !allowed.contains(&name.as_str()) {
                    return Err(invalid_argument(format!(
                        "{context}: unknown option '{name}'; known options are: {}",
                        allowed.join(", ")
                    )));
                }
                entries.push((name, value.dereference()));
            }
        }
        Ok(Self { entries, context })
    }

    pub fn get(&self, key: &str) -> Option<&'a Zval> {
        self.entries
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| *v)
            .filter(|v| !v.is_null())
    }

    fn wrong_type(
        &self,
        key: &str,
        expected: &str,
        got: &Zval,
    ) -> ext_php_rs::exception::PhpException {
        type_error(format!(
            "{}: option '{key}' must be of type {expected}, {} given",
            self.context,
            type_name(got)
        ))
    }

    /// A bool option; `default` when absent or null.
    pub fn bool(&self, key: &str, default: bool) -> PhpResult<bool> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v.bool().ok_or_else(|| self.wrong_type(key, "bool", v)),
        }
    }

    /// An int option; `default` when absent or null.
    pub fn int(&self, key: &str, default: i64) -> PhpResult<i64> {
        match self.get(key) {
            None => Ok(default),
            Some(v) if v.is_long() => Ok(v.long().unwrap_or(default)),
            Some(v) => Err(self.wrong_type(key, "int", v)),
        }
    }

    /// An int option that must lie in `range`.
    pub fn int_in(
        &self,
        key: &str,
        default: i64,
        range: std::ops::RangeInclusive<i64>,
    ) -> PhpResult<i64> {
        let value = self.int(key, default)?;
        if range.contains(&value) {
            Ok(value)
        } else {
            Err(invalid_argument(format!(
                "{}: option '{key}' must be between {} and {}, got {value}",
                self.context,
                range.start(),
                range.end()
            )))
        }
    }

    /// A float option (ints accepted); `default` when absent or null.
    pub fn float(&self, key: &str, default: f64) -> PhpResult<f64> {
        match self.get(key) {
            None => Ok(default),
            Some(v) if v.is_double() || v.is_long() => Ok(v
                .double()
                .or_else(|| v.long().map(|l| l as f64))
                .unwrap_or(default)),
            Some(v) => Err(self.wrong_type(key, "float", v)),
        }
    }

    /// A duration option, in seconds (int or float, >= 0); `default` when absent or null.
    pub fn duration(&self, key: &str, default: Duration) -> PhpResult<Duration> {
        let value = self.float(key, default.as_secs_f64())?;
        if !(value.is_finite() && value >= 0.0) {
            return Err(invalid_argument(format!(
                "{}: option '{key}' must be a number of seconds >= 0, got {value}",
                self.context
            )));
        }
        Ok(Duration::from_secs_f64(value))
    }

    /// A string option, `None` when absent or null.
    pub fn string(&self, key: &str) -> PhpResult<Option<String>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .str()
                .map(|s| Some(s.to_string()))
                .ok_or_else(|| self.wrong_type(key, "string", v)),
        }
    }

    /// An array option, `None` when absent or null.
    pub fn array(&self, key: &str) -> PhpResult<Option<&'a ZendHashTable>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .array()
                .map(Some)
                .ok_or_else(|| self.wrong_type(key, "array", v)),
        }
    }

    /// An `arguments` option converted to an AMQP field table.
    pub fn field_table(&self, key: &str) -> PhpResult<FieldTable> {
        match self.array(key)? {
            None => Ok(FieldTable::default()),
            Some(table) => to_field_table(table, &format!("{} '{key}'", self.context)),
        }
    }
}

/// Converts a PHP array to an AMQP field table; `path` names it in errors.
///
/// Keys become shortstr; values: null → void, bool, int → 64-bit signed, float → double,
/// string → longstr (binary-safe), list → array, other array → nested table.
pub fn to_field_table(array: &ZendHashTable, path: &str) -> PhpResult<FieldTable> {
    let mut table = FieldTable::default();
    for (key, value) in array.iter() {
        let name = key_name(&key);
        let key_path = format!("{path}[{name}]");
        let short = ShortString::try_new(name.clone()).map_err(|_| {
            invalid_argument(format!("{key_path}: a field name may be at most 255 bytes"))
        })?;
        table.insert(short, to_amqp_value(value, &key_path)?);
    }
    Ok(table)
}

/// Converts one PHP value to an AMQP field value; `path` names it in errors.
pub fn to_amqp_value(zval: &Zval, path: &str) -> PhpResult<AMQPValue> {
    let zval = zval.dereference();
    if zval.is_null() {
        Ok(AMQPValue::Void)
    } else if let Some(b) = zval.bool() {
        Ok(AMQPValue::Boolean(b))
    } else if zval.is_long() {
        Ok(AMQPValue::LongLongInt(zval.long().unwrap_or_default()))
    } else if zval.is_double() {
        Ok(AMQPValue::Double(zval.double().unwrap_or_default()))
    } else if let Some(s) = zval.zend_str() {
        Ok(AMQPValue::LongString(LongString::from(
            s.as_bytes().to_vec(),
        )))
    } else if let Some(array) = zval.array() {
        if array.is_empty() || array.has_sequential_keys() {
            let mut items = FieldArray::default();
            for (i, item) in array.values().enumerate() {
                items.push(to_amqp_value(item, &format!("{path}[{i}]"))?);
            }
            Ok(AMQPValue::FieldArray(items))
        } else {
            Ok(AMQPValue::FieldTable(to_field_table(array, path)?))
        }
    } else {
        Err(invalid_argument(format!(
            "{path}: AMQP cannot carry a value of type {}; use null, bool, int, float, string or array",
            type_name(zval)
        )))
    }
}

/// The AMQP basic properties a `properties` array may set.
pub const PROPERTY_KEYS: &[&str] = &[
    "content_type",
    "content_encoding",
    "headers",
    "delivery_mode",
    "priority",
    "correlation_id",
    "reply_to",
    "expiration",
    "message_id",
    "timestamp",
    "type",
    "user_id",
    "app_id",
];

/// Converts a `properties` array to AMQP basic properties; `delivery_mode` defaults to 2
/// (persistent). Unknown keys raise `\InvalidArgumentException`, wrong types `TypeError`.
pub fn to_properties(array: Option<&ZendHashTable>) -> PhpResult<lapin::BasicProperties> {
    let opts = Options::new(array, PROPERTY_KEYS, "message properties")?;
    properties_from(&opts)
}

/// The properties of `Producer::publish()`: the AMQP ones, and `delay` (milliseconds the
/// extension holds the message back before it is routed), which is not sent.
pub fn to_publish_properties(
    array: Option<&ZendHashTable>,
) -> PhpResult<(lapin::BasicProperties, Option<Duration>)> {
    let keys: Vec<&str> = PROPERTY_KEYS.iter().copied().chain(["delay"]).collect();
    let opts = Options::new(array, &keys, "message properties")?;
    let delay = match opts.get("delay") {
        None => None,
        Some(_) => {
            let ms = opts.int_in("delay", 0, 0..=i64::from(u32::MAX))?;
            (ms > 0).then(|| Duration::from_millis(ms as u64))
        }
    };
    Ok((properties_from(&opts)?, delay))
}

fn properties_from(opts: &Options<'_>) -> PhpResult<lapin::BasicProperties> {
    let ctx = "message properties";
    let short = |key: &str| -> PhpResult<Option<ShortString>> {
        match opts.string(key)? {
            None => Ok(None),
            Some(value) => ShortString::try_new(value)
                .map(Some)
                .map_err(|_| invalid_argument(format!("{ctx}: '{key}' may be at most 255 bytes"))),
        }
    };
    let mut props = lapin::BasicProperties::default().with_delivery_mode(opts.int_in(
        "delivery_mode",
        2,
        1..=2,
    )? as u8);
    if let Some(v) = short("content_type")? {
        props = props.with_content_type(v);
    }
    if let Some(v) = short("content_encoding")? {
        props = props.with_content_encoding(v);
    }
    if let Some(headers) = opts.array("headers")? {
        props = props.with_headers(to_field_table(headers, "headers")?);
    }
    if opts.get("priority").is_some() {
        props = props.with_priority(opts.int_in("priority", 0, 0..=255)? as u8);
    }
    if let Some(v) = short("correlation_id")? {
        props = props.with_correlation_id(v);
    }
    if let Some(v) = short("reply_to")? {
        props = props.with_reply_to(v);
    }
    if opts.get("expiration").is_some() {
        // AMQP carries the TTL as a string of milliseconds; accept the natural int too.
        let ms = match opts.get("expiration") {
            Some(v) if v.is_long() => v.long().unwrap_or_default().to_string(),
            _ => opts.string("expiration")?.unwrap_or_default(),
        };
        if ms.is_empty() || !ms.bytes().all(|b| b.is_ascii_digit()) {
            return Err(invalid_argument(format!(
                "{ctx}: 'expiration' must be a number of milliseconds, got '{ms}'"
            )));
        }
        props = props.with_expiration(ShortString::from(ms));
    }
    if let Some(v) = short("message_id")? {
        props = props.with_message_id(v);
    }
    if opts.get("timestamp").is_some() {
        props = props.with_timestamp(opts.int_in("timestamp", 0, 0..=i64::MAX)? as u64);
    }
    if let Some(v) = short("type")? {
        props = props.with_type(v);
    }
    if let Some(v) = short("user_id")? {
        props = props.with_user_id(v);
    }
    if let Some(v) = short("app_id")? {
        props = props.with_app_id(v);
    }
    Ok(props)
}

/// Converts an AMQP field value to a PHP value: strings stay bytes, every integer width
/// becomes int, float/double float, decimal float, void null, arrays lists, tables arrays.
pub fn from_amqp_value(value: &AMQPValue) -> PhpResult<Zval> {
    let mut zval = Zval::new();
    match value {
        AMQPValue::Boolean(b) => zval.set_bool(*b),
        AMQPValue::ShortShortInt(i) => zval.set_long(i64::from(*i)),
        AMQPValue::ShortShortUInt(i) => zval.set_long(i64::from(*i)),
        AMQPValue::ShortInt(i) => zval.set_long(i64::from(*i)),
        AMQPValue::ShortUInt(i) => zval.set_long(i64::from(*i)),
        AMQPValue::LongInt(i) => zval.set_long(i64::from(*i)),
        AMQPValue::LongUInt(i) => zval.set_long(i64::from(*i)),
        AMQPValue::LongLongInt(i) => zval.set_long(*i),
        AMQPValue::Timestamp(t) => zval.set_long(i64::try_from(*t).unwrap_or(i64::MAX)),
        AMQPValue::Float(f) => zval.set_double(f64::from(*f)),
        AMQPValue::Double(f) => zval.set_double(*f),
        AMQPValue::DecimalValue(d) => {
            zval.set_double(f64::from(d.value) / 10f64.powi(i32::from(d.scale)))
        }
        AMQPValue::ShortString(s) => zval.set_binary(s.as_str().as_bytes().to_vec()),
        AMQPValue::LongString(s) => zval.set_binary(s.as_bytes().to_vec()),
        AMQPValue::ByteArray(b) => zval.set_binary(b.as_slice().to_vec()),
        AMQPValue::FieldArray(items) => {
            let mut list = ZendHashTable::with_capacity(items.as_slice().len() as u32);
            for item in items.as_slice() {
                list.push(from_amqp_value(item)?)?;
            }
            zval.set_hashtable(list);
        }
        AMQPValue::FieldTable(table) => zval.set_hashtable(from_field_table(table)?),
        AMQPValue::Void => zval.set_null(),
    }
    Ok(zval)
}

/// Converts an AMQP field table to a PHP array.
pub fn from_field_table(table: &FieldTable) -> PhpResult<ext_php_rs::boxed::ZBox<ZendHashTable>> {
    let mut array = ZendHashTable::with_capacity(table.inner().len() as u32);
    for (key, value) in table.inner() {
        array.insert(key.as_str(), from_amqp_value(value)?)?;
    }
    Ok(array)
}

/// A `string|array` argument read as a non-empty list of strings; `what` is the PHP name of
/// the parameter in errors (`AmqpRs\Connection::__construct(): Argument #1 ($uri)`).
pub fn string_list(zval: &Zval, what: &str) -> PhpResult<Vec<String>> {
    let zval = zval.dereference();
    if let Some(s) = zval.str() {
        return Ok(vec![s.to_string()]);
    }
    let list = zval.array().ok_or_else(|| {
        type_error(format!(
            "{what} must be of type string|array, {} given",
            type_name(zval)
        ))
    })?;
    if list.is_empty() {
        return Err(invalid_argument(format!("{what}: the list is empty")));
    }
    list.values()
        .enumerate()
        .map(|(i, v)| {
            v.dereference().str().map(str::to_string).ok_or_else(|| {
                type_error(format!(
                    "{what}: item #{i} of the list must be of type string, {} given",
                    type_name(v)
                ))
            })
        })
        .collect()
}

/// A `string|array` parameter: ext-php-rs declares it `mixed`, `arginfo` narrows the type.
pub struct StringOrList<'a>(pub &'a Zval);

impl<'a> FromZval<'a> for StringOrList<'a> {
    const TYPE: DataType = DataType::Mixed;

    fn from_zval(zval: &'a Zval) -> Option<Self> {
        Some(StringOrList(zval))
    }
}

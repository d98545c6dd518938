//! Small helpers shared by the double: Vault's field coercions (durations, comma lists, bools),
//! random identifiers, base64url, time formatting.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::Value;
use sha2::{Digest, Sha256};

/// `parseutil.ParseDurationSecond`: a number is seconds, a string of digits is seconds, a string
/// ending in `d` is days, anything else is a Go duration (`1h30m`, `20m`, `1.5h`, `300ms`).
pub(crate) fn parse_duration(value: &Value) -> Result<Duration, String> {
    match value {
        Value::Null => Ok(Duration::ZERO),
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                if i < 0 {
                    return Err(format!("negative duration {i}"));
                }
                Ok(Duration::from_secs(i as u64))
            } else if let Some(f) = n.as_f64() {
                if f < 0.0 || !f.is_finite() {
                    return Err(format!("invalid duration {f}"));
                }
                Ok(Duration::from_secs_f64(f))
            } else {
                Err(format!("invalid duration {n}"))
            }
        }
        Value::String(s) => parse_duration_str(s),
        other => Err(format!("invalid duration {other}")),
    }
}

/// The string form of [`parse_duration`].
pub(crate) fn parse_duration_str(input: &str) -> Result<Duration, String> {
    let s = input.trim();
    if s.is_empty() {
        return Ok(Duration::ZERO);
    }
    if s.bytes().all(|b| b.is_ascii_digit()) {
        return s
            .parse::<u64>()
            .map(Duration::from_secs)
            .map_err(|_| format!("time: invalid duration {input:?}"));
    }
    if let Some(days) = s.strip_suffix('d')
        && !days.is_empty()
        && days.bytes().all(|b| b.is_ascii_digit())
    {
        return days
            .parse::<u64>()
            .map(|d| Duration::from_secs(d * 86_400))
            .map_err(|_| format!("time: invalid duration {input:?}"));
    }
    parse_go_duration(s).ok_or_else(|| format!("time: invalid duration {input:?}"))
}

/// Go's `time.ParseDuration` for non-negative values.
fn parse_go_duration(s: &str) -> Option<Duration> {
    let s = s.strip_prefix('+').unwrap_or(s);
    if s == "0" {
        return Some(Duration::ZERO);
    }
    let bytes = s.as_bytes();
    let mut i = 0;
    let mut total_nanos: f64 = 0.0;
    if bytes.is_empty() {
        return None;
    }
    while i < bytes.len() {
        let start = i;
        while i < bytes.len() && (bytes[i].is_ascii_digit() || bytes[i] == b'.') {
            i += 1;
        }
        if start == i {
            return None;
        }
        let number: f64 = s[start..i].parse().ok()?;
        let unit_start = i;
        while i < bytes.len() && !(bytes[i].is_ascii_digit() || bytes[i] == b'.') {
            i += 1;
        }
        let unit = &s[unit_start..i];
        let scale = match unit {
            "ns" => 1.0,
            "us" | "µs" | "μs" => 1e3,
            "ms" => 1e6,
            "s" => 1e9,
            "m" => 60e9,
            "h" => 3600e9,
            _ => return None,
        };
        total_nanos += number * scale;
    }
    Some(Duration::from_nanos(total_nanos.round() as u64))
}

/// A duration field of a request body: absent is `None`, present but invalid is the error Vault's
/// framework gives.
pub(crate) fn duration_field(
    body: &serde_json::Map<String, Value>,
    field: &str,
) -> Result<Option<Duration>, String> {
    match body.get(field) {
        None => Ok(None),
        Some(v) => parse_duration(v)
            .map(Some)
            .map_err(|e| format!("error converting input {v} for field {field:?}: {e}")),
    }
}

/// `TypeCommaStringSlice`: an array of strings (or scalars) or one comma-separated string.
pub(crate) fn comma_slice(value: &Value) -> Result<Vec<String>, String> {
    let items: Vec<String> = match value {
        Value::Null => Vec::new(),
        Value::String(s) => s.split(',').map(|p| p.trim().to_string()).collect(),
        Value::Array(items) => items
            .iter()
            .map(|v| match v {
                Value::String(s) => Ok(s.trim().to_string()),
                Value::Number(n) => Ok(n.to_string()),
                Value::Bool(b) => Ok(b.to_string()),
                other => Err(format!("cannot use {other} as a string")),
            })
            .collect::<Result<_, _>>()?,
        Value::Number(n) => vec![n.to_string()],
        other => return Err(format!("cannot use {other} as a list of strings")),
    };
    Ok(items.into_iter().filter(|s| !s.is_empty()).collect())
}

/// A comma-slice field of a request body.
pub(crate) fn slice_field(
    body: &serde_json::Map<String, Value>,
    field: &str,
) -> Result<Option<Vec<String>>, String> {
    match body.get(field) {
        None => Ok(None),
        Some(v) => comma_slice(v)
            .map(Some)
            .map_err(|e| format!("error converting input {v} for field {field:?}: {e}")),
    }
}

/// `TypeStringSlice`: an array of strings, or one string as a one-element list.
pub(crate) fn string_slice_field(
    body: &serde_json::Map<String, Value>,
    field: &str,
) -> Result<Option<Vec<String>>, String> {
    match body.get(field) {
        None => Ok(None),
        Some(Value::Null) => Ok(Some(Vec::new())),
        Some(Value::String(s)) => Ok(Some(vec![s.clone()])),
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| match v {
                Value::String(s) => Ok(s.clone()),
                other => Err(format!(
                    "error converting input {other} for field {field:?}: not a string"
                )),
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Some),
        Some(other) => Err(format!(
            "error converting input {other} for field {field:?}: not a list of strings"
        )),
    }
}

/// `TypeBool`, with Go's `strconv.ParseBool` for strings.
pub(crate) fn bool_field(
    body: &serde_json::Map<String, Value>,
    field: &str,
) -> Result<Option<bool>, String> {
    match body.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(Value::String(s)) => match s.as_str() {
            "1" | "t" | "T" | "TRUE" | "true" | "True" => Ok(Some(true)),
            "0" | "f" | "F" | "FALSE" | "false" | "False" => Ok(Some(false)),
            _ => Err(format!(
                "error converting input {s:?} for field {field:?}: invalid syntax"
            )),
        },
        Some(Value::Number(n)) => Ok(Some(n.as_f64().unwrap_or(0.0) != 0.0)),
        Some(other) => Err(format!(
            "error converting input {other} for field {field:?}: not a bool"
        )),
    }
}

/// `TypeString`: strings as they are, numbers and bools as text.
pub(crate) fn string_field(
    body: &serde_json::Map<String, Value>,
    field: &str,
) -> Result<Option<String>, String> {
    match body.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(Value::Number(n)) => Ok(Some(n.to_string())),
        Some(Value::Bool(b)) => Ok(Some(b.to_string())),
        Some(other) => Err(format!(
            "error converting input {other} for field {field:?}: not a string"
        )),
    }
}

/// Vault's `humanDuration`: Go's `Duration.String()` without the trailing zero units.
pub(crate) fn human_duration(d: Duration) -> String {
    let total = d.as_secs();
    if total == 0 && d.subsec_nanos() == 0 {
        return "0s".into();
    }
    let (h, m, s) = (total / 3600, (total % 3600) / 60, total % 60);
    let mut out = if h > 0 {
        format!("{h}h{m}m{s}s")
    } else if m > 0 {
        format!("{m}m{s}s")
    } else {
        format!("{s}s")
    };
    if out.ends_with("m0s") {
        out.truncate(out.len() - 2);
    }
    if let Some(idx) = out.find("h0m") {
        out = format!("{}{}", &out[..idx + 1], &out[idx + 3..]);
    }
    out
}

/// RFC 3339 with nanoseconds, as Vault prints times.
pub(crate) fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::AutoSi, true)
}

/// `t + d`.
pub(crate) fn add(t: DateTime<Utc>, d: Duration) -> DateTime<Utc> {
    t + chrono::Duration::from_std(d).unwrap_or(chrono::Duration::MAX)
}

/// `a - b`, zero when negative.
pub(crate) fn until(a: DateTime<Utc>, b: DateTime<Utc>) -> Duration {
    (a - b).to_std().unwrap_or(Duration::ZERO)
}

/// The time truncated to the second (Vault's TTL arithmetic works in whole seconds).
pub(crate) fn trunc_secs(t: DateTime<Utc>) -> DateTime<Utc> {
    DateTime::from_timestamp(t.timestamp(), 0).unwrap_or(t)
}

/// `count` random bytes from SHA-256 over the process's random hasher keys, a counter and the
/// clock (no `rand` crate in the tree; these identifiers need to be unique and unguessable in a
/// test, not cryptographically strong).
pub(crate) fn random_bytes(count: usize) -> Vec<u8> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut out = Vec::with_capacity(count);
    while out.len() < count {
        let mut hasher = RandomState::new().build_hasher();
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        hasher.write_u64(n);
        let mut digest = Sha256::new();
        digest.update(hasher.finish().to_le_bytes());
        digest.update(n.to_le_bytes());
        digest.update(
            Utc::now()
                .timestamp_nanos_opt()
                .unwrap_or_default()
                .to_le_bytes(),
        );
        digest.update(std::process::id().to_le_bytes());
        out.extend_from_slice(&digest.finalize());
    }
    out.truncate(count);
    out
}

const BASE62: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// A random string of `len` characters from `[0-9A-Za-z]` (Vault's `base62.Random`).
pub(crate) fn random_base62(len: usize) -> String {
    random_bytes(len * 2)
        .chunks(2)
        .map(|c| BASE62[(u16::from_le_bytes([c[0], c[1]]) % 62) as usize] as char)
        .collect()
}

/// A UUID-shaped identifier: random, or derived from `seed` when given.
pub(crate) fn uuid(seed: Option<&str>) -> String {
    let bytes = match seed {
        Some(s) => Sha256::digest(s.as_bytes()).to_vec(),
        None => random_bytes(16),
    };
    let h = hex::encode(&bytes[..16]);
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// A password like Vault's default password policy makes: 20 characters with at least one
/// lowercase letter, one uppercase letter, one digit and one dash.
pub(crate) fn random_password() -> String {
    let body = random_base62(16);
    let bytes = random_bytes(3);
    let lower = (b'a' + bytes[0] % 26) as char;
    let upper = (b'A' + bytes[1] % 26) as char;
    let digit = (b'0' + bytes[2] % 10) as char;
    format!("{upper}{}-{lower}{digit}{}", &body[..8], &body[8..16])
}

/// Decodes base64url (with or without padding), as JWT segments use.
pub(crate) fn base64url_decode(input: &str) -> Result<Vec<u8>, String> {
    let input = input.trim_end_matches('=');
    let mut out = Vec::with_capacity(input.len() * 3 / 4);
    let mut buffer: u32 = 0;
    let mut bits = 0;
    for c in input.bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'-' | b'+' => 62,
            b'_' | b'/' => 63,
            _ => return Err(format!("illegal base64 data: {:?}", c as char)),
        };
        buffer = (buffer << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((buffer >> bits) as u8);
            buffer &= (1 << bits) - 1;
        }
    }
    if bits >= 6 {
        return Err("illegal base64 data: truncated".into());
    }
    Ok(out)
}

/// Encodes base64url without padding (for tests that build JWT-shaped strings).
pub(crate) fn base64url_encode(input: &[u8]) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::with_capacity(input.len().div_ceil(3) * 4);
    for chunk in input.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        let chars = chunk.len() + 1;
        for i in 0..chars {
            out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

/// `policyutil.SanitizePolicies`: lowercase, trimmed, no empties; `root` alone when present;
/// `default` added when asked and `root` is absent; sorted and deduplicated.
pub(crate) fn sanitize_policies(policies: &[String], add_default: bool) -> Vec<String> {
    let mut out: Vec<String> = policies
        .iter()
        .map(|p| p.trim().to_lowercase())
        .filter(|p| !p.is_empty())
        .collect();
    if out.iter().any(|p| p == "root") {
        return vec!["root".into()];
    }
    if add_default && !out.iter().any(|p| p == "default") {
        out.push("default".into());
    }
    out.sort();
    out.dedup();
    out
}

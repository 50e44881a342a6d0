//! The text form parsed: clauses, keys, operators and values, with errors that point at the
//! column.

use super::*;

/// Characters of the input shown on each side of an error.
const SHOWN_AROUND: usize = 40;

fn err(input: &str, at: usize, message: impl Into<String>) -> ParseError {
    let at = at.min(input.len());
    let column = input[..at].chars().count() + 1;
    // Only a window around the error: a huge input must not come back in the error whole.
    let chars: Vec<char> = input.chars().collect();
    let from = (column - 1).saturating_sub(SHOWN_AROUND);
    let to = (column - 1 + SHOWN_AROUND).min(chars.len());
    let mut shown: String = chars[from..to].iter().collect();
    let mut caret_at = column - 1 - from;
    if from > 0 {
        shown.insert(0, '…');
        caret_at += 1;
    }
    if to < chars.len() {
        shown.push('…');
    }
    ParseError {
        message: crate::types::quote_prefix(&message.into(), 400),
        column,
        input: input.to_string(),
        shown,
        caret: format!("{}^", " ".repeat(caret_at)),
    }
}

const KNOWN_KEYS: &str =
    "gpu.count, gpu.memory, gpu.free_memory, gpu.name, gpu.compute, gpu.uuid, \
    label.<name>, credential, network, resource.<name>, host.memory, host.disk, host.cpus, \
    host.os, host.arch, host.hostname";

/// A piece of the input as an error message quotes it.
fn short(text: &str) -> String {
    crate::types::quote_prefix(text, 60)
}

fn parse_key(input: &str, at: usize, text: &str) -> Result<Key, ParseError> {
    let bad_name = |name: &str| {
        name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '/'))
    };
    Ok(match text {
        "gpu.count" => Key::GpuCount,
        "gpu.memory" => Key::GpuMemory,
        "gpu.free_memory" => Key::GpuFreeMemory,
        "gpu.name" => Key::GpuName,
        "gpu.compute" => Key::GpuCompute,
        "gpu.uuid" => Key::GpuUuid,
        "credential" => Key::Credential,
        "network" => Key::Network,
        "host.memory" => Key::HostMemory,
        "host.disk" => Key::HostDisk,
        "host.cpus" => Key::HostCpus,
        "host.os" => Key::HostOs,
        "host.arch" => Key::HostArch,
        "host.hostname" => Key::HostName,
        _ => {
            if let Some(name) = text.strip_prefix("label.") {
                if bad_name(name) {
                    return Err(err(
                        input,
                        at,
                        format!(
                            "label name {:?} must be letters, digits, '_', '-', '.' or '/'",
                            short(name)
                        ),
                    ));
                }
                Key::Label(name.to_string())
            } else if let Some(name) = text.strip_prefix("resource.") {
                if bad_name(name) {
                    return Err(err(
                        input,
                        at,
                        format!(
                            "resource name {:?} must be letters, digits, '_', '-', '.' or '/'",
                            short(name)
                        ),
                    ));
                }
                Key::Resource(name.to_string())
            } else if text.is_empty() {
                return Err(err(
                    input,
                    at,
                    format!("expected a key (one of {KNOWN_KEYS})"),
                ));
            } else {
                return Err(err(
                    input,
                    at,
                    format!(
                        "unknown key {:?}; expected one of {KNOWN_KEYS}",
                        short(text)
                    ),
                ));
            }
        }
    })
}

fn parse_value(input: &str, at: usize, key: &Key, op: Op, text: &str) -> Result<Value, ParseError> {
    if op == Op::Eq {
        if let Some(rest) = text.strip_prefix('=') {
            // Else `label.zone==a` would ask, without a word, for a label whose value is "=a".
            return Err(err(
                input,
                at,
                format!(
                    "'==' is not an operator here: write {}={}",
                    key.name(),
                    rest.trim_start()
                ),
            ));
        }
    }
    let kind = key.kind();
    let allowed = match kind {
        ValueKind::Count | ValueKind::Bytes | ValueKind::Version => op != Op::Contains,
        ValueKind::Text => matches!(op, Op::Eq | Op::Ne | Op::Contains),
        ValueKind::Name => op == Op::Eq,
    };
    if !allowed {
        let hint = match kind {
            ValueKind::Name => "only '=' is allowed",
            ValueKind::Text => "use '=', '!=' or '~'",
            _ => "use '=', '!=', '>=', '>', '<=' or '<'",
        };
        return Err(err(
            input,
            at,
            format!(
                "operator '{}' does not apply to {}: {hint}",
                op.text(),
                key.name()
            ),
        ));
    }
    if text.is_empty() {
        return Err(err(
            input,
            at,
            format!("expected a value after {}{}", key.name(), op.text()),
        ));
    }
    match kind {
        ValueKind::Count => text.parse::<u64>().map(Value::Number).map_err(|_| {
            err(
                input,
                at,
                format!("expected a whole number for {}, found {text:?}", key.name()),
            )
        }),
        ValueKind::Bytes => {
            let split = text
                .find(|c: char| !c.is_ascii_digit() && c != '.')
                .unwrap_or(text.len());
            let (num, unit) = text.split_at(split);
            let Some((_, size)) = UNITS.iter().find(|(u, _)| *u == unit) else {
                return Err(err(input, at + split, format!(
                    "expected a size with a unit (B, KB, MB, GB, TB, KiB, MiB, GiB, TiB) for {}, found {text:?}",
                    key.name()
                )));
            };
            let n: f64 = num.parse().map_err(|_| {
                err(
                    input,
                    at,
                    format!("expected a number before the unit, found {num:?}"),
                )
            })?;
            Ok(Value::Number((n * *size as f64).round() as u64))
        }
        ValueKind::Version => {
            let (a, b) = text.split_once('.').unwrap_or((text, "0"));
            match (a.parse::<u32>(), b.parse::<u32>()) {
                (Ok(a), Ok(b)) => Ok(Value::Version(a, b)),
                _ => Err(err(
                    input,
                    at,
                    format!(
                        "expected a version such as 8.0 for {}, found {text:?}",
                        key.name()
                    ),
                )),
            }
        }
        ValueKind::Text | ValueKind::Name => Ok(Value::Text(text.to_string())),
    }
}

fn parse_predicate(input: &str, at: usize, text: &str) -> Result<Predicate, ParseError> {
    let op_at = text.find(['=', '!', '>', '<', '~']).ok_or_else(|| {
        err(
            input,
            at + text.len(),
            format!(
                "expected an operator (=, !=, >=, >, <=, <, ~) after {:?}",
                text.trim()
            ),
        )
    })?;
    let key_text = text[..op_at].trim();
    let key_at = at + text[..op_at].find(key_text).unwrap_or(0);
    let key = parse_key(input, key_at, key_text)?;
    let rest = &text[op_at..];
    let (op, len) = if rest.starts_with(">=") {
        (Op::Ge, 2)
    } else if rest.starts_with("<=") {
        (Op::Le, 2)
    } else if rest.starts_with("!=") {
        (Op::Ne, 2)
    } else if rest.starts_with('>') {
        (Op::Gt, 1)
    } else if rest.starts_with('<') {
        (Op::Lt, 1)
    } else if rest.starts_with('=') {
        (Op::Eq, 1)
    } else if rest.starts_with('~') {
        (Op::Contains, 1)
    } else {
        return Err(err(
            input,
            at + op_at,
            "expected an operator (=, !=, >=, >, <=, <, ~)",
        ));
    };
    let value_raw = &rest[len..];
    let value_text = value_raw.trim();
    let value_at = at + op_at + len + value_raw.find(value_text).unwrap_or(0);
    let value = parse_value(input, value_at, &key, op, value_text)?;
    Ok(Predicate { key, op, value })
}

impl std::str::FromStr for Requirements {
    type Err = ParseError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let mut reqs = Requirements::default();
        if input.trim().is_empty() {
            return Ok(reqs);
        }
        let mut offset = 0;
        for raw in input.split(',') {
            let at = offset;
            offset += raw.len() + 1;
            let trimmed = raw.trim_start();
            let at = at + (raw.len() - trimmed.len());
            let clause = trimmed.trim_end();
            if clause.is_empty() {
                return Err(err(
                    input,
                    at,
                    "expected a clause (a comma is doubled or trailing)",
                ));
            }
            if let Some(rest) = clause.strip_prefix("prefer ") {
                let rest_at = at + "prefer ".len() + (rest.len() - rest.trim_start().len());
                let rest = rest.trim_start();
                // The weight follows the last ':' (values such as uuids never contain one here).
                let (pred_text, weight) = match rest.rfind(':') {
                    Some(i) => {
                        let w = rest[i + 1..].trim();
                        let weight = w.parse::<u32>().map_err(|_| {
                            err(
                                input,
                                rest_at + i + 1,
                                format!("expected a whole-number weight after ':', found {w:?}"),
                            )
                        })?;
                        (&rest[..i], weight)
                    }
                    None => (rest, 1),
                };
                reqs.soft
                    .push((parse_predicate(input, rest_at, pred_text)?, weight));
            } else {
                reqs.hard.push(parse_predicate(input, at, clause)?);
            }
        }
        Ok(reqs)
    }
}

// ----------------------------------------------------------------------------------------------
// Matching
// ----------------------------------------------------------------------------------------------

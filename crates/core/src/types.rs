//! Typed ids, limits and validation shared by the server, the client and the worker.

use std::fmt;
use std::str::FromStr;

/// Longest namespace, workflow id, type, queue or signal name accepted (in bytes).
pub const MAX_NAME_LEN: usize = 255;
/// Largest payload accepted by default (2 MiB).
pub const DEFAULT_MAX_PAYLOAD_BYTES: usize = 2 * 1024 * 1024;
/// The namespace that always exists.
pub const DEFAULT_NAMESPACE: &str = "default";
/// Longest duration (timeout, timer, interval, retention) accepted on the wire: 100 years, in
/// milliseconds. Anything longer is a mistake, and deadlines stay far from overflowing.
pub const MAX_DURATION_MS: u64 = 100 * 365 * 24 * 3_600_000;
/// Most bytes of the caller's input an error message quotes.
pub const MAX_QUOTED_INPUT: usize = 120;

/// Refuses a duration above [`MAX_DURATION_MS`], naming the field.
pub fn check_duration_ms(field: &str, ms: u64) -> Result<(), String> {
    if ms > MAX_DURATION_MS {
        return Err(format!(
            "{field} is {ms} ms; the most is {MAX_DURATION_MS} ms (100 years); use 0 where the \
             field allows no limit"
        ));
    }
    Ok(())
}

/// A duration as wire milliseconds for a field that must hold a limit: clamped to
/// [`MAX_DURATION_MS`] (so `Duration::MAX` means "as long as allowed"), and at least 1 ms for
/// a non-zero duration (0 would mean "not set").
pub fn duration_ms(d: std::time::Duration) -> u64 {
    if d.is_zero() {
        return 0;
    }
    (d.as_millis().min(MAX_DURATION_MS as u128) as u64).max(1)
}

/// A duration as wire milliseconds for a field where 0 means "no limit": `Duration::MAX` (or
/// anything past [`MAX_DURATION_MS`]) becomes 0.
pub fn limit_ms(d: std::time::Duration) -> u64 {
    if d.as_millis() > MAX_DURATION_MS as u128 {
        0
    } else {
        duration_ms(d)
    }
}

/// At most `max` bytes of `text` (cut at a character boundary), marked when cut, for quoting
/// the caller's input in an error without echoing all of it.
pub fn quote_prefix(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… ({} bytes in all)", &text[..end], text.len())
}

/// Why a name or id was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// The name was empty.
    #[error("{what} must not be empty")]
    Empty {
        /// Which field.
        what: &'static str,
    },
    /// The name was longer than [`MAX_NAME_LEN`].
    #[error("{what} is {len} bytes long; the limit is {max} bytes")]
    TooLong {
        /// Which field.
        what: &'static str,
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The name holds a control character (these break logs and CLI output).
    #[error("{what} contains a control character at byte {at}; use printable characters only")]
    ControlChar {
        /// Which field.
        what: &'static str,
        /// Byte offset.
        at: usize,
    },
}

/// Checks a name or id: non-empty, at most [`MAX_NAME_LEN`] bytes, no control characters.
pub fn validate_name(what: &'static str, value: &str) -> Result<(), NameError> {
    if value.is_empty() {
        return Err(NameError::Empty { what });
    }
    if value.len() > MAX_NAME_LEN {
        return Err(NameError::TooLong {
            what,
            len: value.len(),
            max: MAX_NAME_LEN,
        });
    }
    if let Some((at, _)) = value.char_indices().find(|(_, c)| c.is_control()) {
        return Err(NameError::ControlChar { what, at });
    }
    Ok(())
}

macro_rules! string_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            /// Wraps a string without checking it (ids coming back from the server).
            pub fn new(value: impl Into<String>) -> Self {
                Self(value.into())
            }
            /// The id as text.
            pub fn as_str(&self) -> &str {
                &self.0
            }
            /// True for the empty id ("none", where the wire allows it).
            pub fn is_empty(&self) -> bool {
                self.0.is_empty()
            }
        }

        // Shown as the quoted text it is, so messages read the same as with plain strings.
        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(&self.0, f)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl FromStr for $name {
            type Err = NameError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                validate_name(stringify!($name), s)?;
                Ok(Self(s.to_string()))
            }
        }

        impl From<&str> for $name {
            fn from(s: &str) -> Self {
                Self(s.to_string())
            }
        }

        impl From<String> for $name {
            fn from(s: String) -> Self {
                Self(s)
            }
        }

        impl From<&String> for $name {
            fn from(s: &String) -> Self {
                Self(s.clone())
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> String {
                id.0
            }
        }

        // Hash and Eq are the inner string's, so a map keyed by the id is looked up by `&str`.
        impl std::borrow::Borrow<str> for $name {
            fn borrow(&self) -> &str {
                &self.0
            }
        }

        // Lookups by the text the wire carries (`&String`).
        impl std::borrow::Borrow<String> for $name {
            fn borrow(&self) -> &String {
                &self.0
            }
        }

        // An id reads as the text it is (`&id` where a `&str` is asked for); the other way, text
        // becomes an id only through `From`, `new` or a checked `parse`.
        impl std::ops::Deref for $name {
            type Target = str;
            fn deref(&self) -> &str {
                &self.0
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl PartialEq<str> for $name {
            fn eq(&self, other: &str) -> bool {
                self.0 == other
            }
        }

        impl PartialEq<&str> for $name {
            fn eq(&self, other: &&str) -> bool {
                self.0 == *other
            }
        }

        impl PartialEq<String> for $name {
            fn eq(&self, other: &String) -> bool {
                &self.0 == other
            }
        }

        impl PartialEq<$name> for String {
            fn eq(&self, other: &$name) -> bool {
                *self == other.0
            }
        }

        impl PartialEq<$name> for &str {
            fn eq(&self, other: &$name) -> bool {
                *self == other.0
            }
        }
    };
}

string_id!(
    /// A workflow id: chosen by the caller, unique per namespace among running workflows.
    WorkflowId
);
string_id!(
    /// One run of a workflow (or of a standalone activity): generated by the server.
    RunId
);
string_id!(
    /// A worker's identity as it reports it in polls and completions.
    WorkerId
);
string_id!(
    /// A task queue name.
    TaskQueue
);
string_id!(
    /// A namespace: the unit of isolation and of authorization.
    Namespace
);
string_id!(
    /// An activity id: of a standalone activity (chosen by the caller, unique per namespace
    /// among running ones), or of an activity inside a workflow run.
    ActivityId
);
string_id!(
    /// A session: chosen by the caller or generated by the server.
    SessionId
);

impl RunId {
    /// A fresh run id. Time-ordered (UUIDv7) so that new rows land at the end of the store's
    /// indexes instead of on random pages.
    pub fn generate() -> Self {
        Self(uuid::Uuid::now_v7().to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_id_reads_as_its_text_but_text_is_no_id_without_a_conversion() {
        let run = RunId::from("0190-a");
        assert_eq!(format!("{run} {run:?}"), "0190-a \"0190-a\"");
        assert_eq!(run, "0190-a");
        assert_eq!(run.len(), 6, "derefs to str");
        let mut by_run: std::collections::HashMap<RunId, u32> = Default::default();
        by_run.insert(run.clone(), 1);
        assert_eq!(by_run.get("0190-a"), Some(&1), "looked up by text");
        let wire_text: String = "0190-a".into();
        assert_eq!(by_run.get(&wire_text), Some(&1));
        assert!(
            "bad\nid".parse::<SessionId>().is_err(),
            "parsing checks the name"
        );
        assert_eq!(String::from(run), "0190-a");
    }

    #[test]
    fn names_are_checked() {
        assert!(validate_name("workflow id", "order-1").is_ok());
        assert_eq!(
            validate_name("workflow id", ""),
            Err(NameError::Empty {
                what: "workflow id"
            })
        );
        let long = "x".repeat(MAX_NAME_LEN + 1);
        assert!(matches!(
            validate_name("queue", &long),
            Err(NameError::TooLong { len: 256, .. })
        ));
        assert!(matches!(
            validate_name("queue", "a\nb"),
            Err(NameError::ControlChar { at: 1, .. })
        ));
    }

    #[test]
    fn durations_are_bounded_and_duration_max_means_no_limit() {
        use std::time::Duration;
        assert!(check_duration_ms("run_timeout_ms", MAX_DURATION_MS).is_ok());
        let e = check_duration_ms("run_timeout_ms", u64::MAX).unwrap_err();
        assert!(
            e.starts_with("run_timeout_ms is 18446744073709551615 ms"),
            "{e}"
        );
        assert_eq!(duration_ms(Duration::MAX), MAX_DURATION_MS);
        assert_eq!(duration_ms(Duration::from_micros(10)), 1);
        assert_eq!(duration_ms(Duration::ZERO), 0);
        assert_eq!(limit_ms(Duration::MAX), 0);
        assert_eq!(limit_ms(Duration::from_secs(2)), 2_000);
    }

    #[test]
    fn quotes_are_cut_at_a_character_boundary() {
        assert_eq!(quote_prefix("short", 10), "short");
        let cut = quote_prefix(&"é".repeat(100), 5);
        assert!(cut.starts_with("éé…"), "{cut}");
        assert!(cut.ends_with("(200 bytes in all)"), "{cut}");
    }

    #[test]
    fn ids_parse_and_display() {
        let id: WorkflowId = "wf-1".parse().unwrap();
        assert_eq!(id.to_string(), "wf-1");
        assert!("".parse::<TaskQueue>().is_err());
    }
}

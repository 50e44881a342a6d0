//! Plain payloads: values to JSON (or raw bytes) and back, the codec trait, and the errors of
//! both.

use serde::{de::DeserializeOwned, Serialize};
use tether_wire::pb::Payload;
use tether_wire::ENCODING_KEY;

/// Why a codec could not encode or decode a payload.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CodecError {
    /// The payload names a key this converter does not have.
    #[error("payload was encrypted with key {0:?}, which this data converter does not have; add that key to the key file")]
    UnknownKey(String),
    /// Decryption failed (wrong key material under that id, or a corrupted payload).
    #[error("payload could not be decrypted with key {0:?}: wrong key or corrupted payload")]
    Decrypt(String),
    /// Encryption failed.
    #[error("payload could not be encrypted with key {0:?}")]
    Encrypt(String),
    /// The key file or variable is malformed.
    #[error("encryption keys: {0}")]
    BadKeys(String),
    /// The payload claims an encoding but its bytes do not decode.
    #[error("{0}")]
    Corrupt(String),
}

/// A transformation of payloads (encryption, compression) applied by clients and workers.
pub trait PayloadCodec: Send + Sync {
    /// Transforms a payload on its way out.
    fn encode(&self, payload: Payload) -> Result<Payload, CodecError>;
    /// Undoes [`PayloadCodec::encode`]; payloads it does not recognise pass through unchanged.
    fn decode(&self, payload: Payload) -> Result<Payload, CodecError>;
}

/// Encoding name of JSON payloads.
pub const JSON_ENCODING: &str = "json/plain";
/// Encoding name of raw byte payloads.
pub const BINARY_ENCODING: &str = "binary/plain";
/// Encoding name of encrypted payloads.
pub const ENCRYPTED_ENCODING: &str = "binary/encrypted";
/// Metadata key naming the key that encrypted a payload.
pub const KEY_ID_KEY: &str = "encryption-key-id";

/// Why a payload could not be converted.
#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    /// The value could not be serialised to JSON.
    #[error("could not encode value as JSON: {0}")]
    Encode(String),
    /// The payload's bytes are not the JSON of the expected type.
    #[error("could not decode {encoding} payload into the expected type: {reason}")]
    Decode {
        /// The payload's encoding.
        encoding: String,
        /// What serde said.
        reason: String,
    },
    /// The payload uses an encoding this converter does not know.
    #[error("payload encoding {0:?} is not supported by this converter")]
    UnknownEncoding(String),
    /// A codec failed.
    #[error(transparent)]
    Codec(#[from] CodecError),
}

/// Encodes a value as a JSON payload.
pub fn to_payload<T: Serialize + ?Sized>(value: &T) -> Result<Payload, ConvertError> {
    let data = serde_json::to_vec(value).map_err(|e| ConvertError::Encode(e.to_string()))?;
    Ok(json_payload(data))
}

/// Wraps bytes that are already JSON text in a payload.
pub fn json_payload(data: Vec<u8>) -> Payload {
    let mut metadata = std::collections::BTreeMap::new();
    metadata.insert(ENCODING_KEY.to_string(), JSON_ENCODING.as_bytes().to_vec());
    Payload { metadata, data }
}

/// Wraps raw bytes in a payload that passes through the converter unchanged.
pub fn binary_payload(data: Vec<u8>) -> Payload {
    let mut metadata = std::collections::BTreeMap::new();
    metadata.insert(
        ENCODING_KEY.to_string(),
        BINARY_ENCODING.as_bytes().to_vec(),
    );
    Payload { metadata, data }
}

/// The payload's encoding name ("" when missing).
pub fn encoding_of(payload: &Payload) -> String {
    payload
        .metadata
        .get(ENCODING_KEY)
        .map(|v| String::from_utf8_lossy(v).into_owned())
        .unwrap_or_default()
}

/// Decodes a payload into a value. A missing payload decodes as JSON `null`, so `()` and
/// `Option<T>` work for "no input".
pub fn from_payload<T: DeserializeOwned>(payload: Option<&Payload>) -> Result<T, ConvertError> {
    let Some(payload) = payload else {
        return serde_json::from_slice(b"null").map_err(|e| ConvertError::Decode {
            encoding: "none".into(),
            reason: e.to_string(),
        });
    };
    let encoding = encoding_of(payload);
    match encoding.as_str() {
        JSON_ENCODING | "" => {
            let data: &[u8] = if payload.data.is_empty() {
                b"null"
            } else {
                &payload.data
            };
            serde_json::from_slice(data).map_err(|e| ConvertError::Decode {
                encoding: JSON_ENCODING.into(),
                reason: e.to_string(),
            })
        }
        BINARY_ENCODING => {
            // Raw bytes decode into anything that deserialises from a byte sequence.
            let value = serde_json::to_value(&payload.data).map_err(|e| ConvertError::Decode {
                encoding: encoding.clone(),
                reason: e.to_string(),
            })?;
            serde_json::from_value(value).map_err(|e| ConvertError::Decode {
                encoding,
                reason: e.to_string(),
            })
        }
        other => Err(ConvertError::UnknownEncoding(other.to_string())),
    }
}

/// Renders a payload for people: JSON as text, other encodings as a short description.
pub fn display_payload(payload: Option<&Payload>) -> String {
    match payload {
        None => "null".into(),
        Some(p) => match encoding_of(p).as_str() {
            JSON_ENCODING | "" => String::from_utf8_lossy(&p.data).into_owned(),
            ENCRYPTED_ENCODING => format!(
                "<encrypted with key {:?}, {} bytes>",
                p.metadata
                    .get(KEY_ID_KEY)
                    .map(|v| String::from_utf8_lossy(v).into_owned())
                    .unwrap_or_default(),
                p.data.len()
            ),
            enc => format!("<{} bytes, encoding {enc}>", p.data.len()),
        },
    }
}

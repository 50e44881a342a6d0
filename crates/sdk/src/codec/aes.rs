//! AES-256-GCM payload encryption. Each payload gets a fresh random 96-bit nonce; the key id is
//! written in the payload's metadata so several keys can be held for rotation: encrypt with the
//! active one, decrypt with any known one.

use super::payload::{encoding_of, CodecError, PayloadCodec, ENCRYPTED_ENCODING, KEY_ID_KEY};
use aes_gcm::aead::{Aead, Generate, KeyInit};
use aes_gcm::{Aes256Gcm, Key, Nonce};
use prost::Message;
use std::collections::BTreeMap;
use std::path::Path;
use tether_wire::pb::Payload;

const NONCE_LEN: usize = 12;

/// The AES-256-GCM codec.
pub struct AesGcmCodec {
    active: String,
    keys: BTreeMap<String, Aes256Gcm>,
}

impl std::fmt::Debug for AesGcmCodec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print key material.
        f.debug_struct("AesGcmCodec")
            .field("active", &self.active)
            .field("key_ids", &self.keys.keys().collect::<Vec<_>>())
            .finish()
    }
}

fn parse_hex_key(id: &str, hex: &str) -> Result<[u8; 32], CodecError> {
    let hex = hex.trim();
    let bad = || {
        CodecError::BadKeys(format!(
            "key {id:?} must be 64 hex characters (32 bytes), found {} characters",
            hex.len()
        ))
    };
    if hex.len() != 64 {
        return Err(bad());
    }
    let mut out = [0u8; 32];
    for (i, chunk) in hex.as_bytes().chunks(2).enumerate() {
        let s = std::str::from_utf8(chunk).map_err(|_| bad())?;
        out[i] = u8::from_str_radix(s, 16).map_err(|_| bad())?;
    }
    Ok(out)
}

impl AesGcmCodec {
    /// A codec with one key.
    pub fn new(key_id: &str, key: [u8; 32]) -> Self {
        let mut keys = BTreeMap::new();
        keys.insert(
            key_id.to_string(),
            Aes256Gcm::new(&Key::<Aes256Gcm>::from(key)),
        );
        AesGcmCodec {
            active: key_id.to_string(),
            keys,
        }
    }

    /// Adds a key that can decrypt (and, with [`AesGcmCodec::activate`], encrypt).
    pub fn with_key(mut self, key_id: &str, key: [u8; 32]) -> Self {
        self.keys.insert(
            key_id.to_string(),
            Aes256Gcm::new(&Key::<Aes256Gcm>::from(key)),
        );
        self
    }

    /// Makes `key_id` the key new payloads are encrypted with.
    pub fn activate(mut self, key_id: &str) -> Result<Self, CodecError> {
        if !self.keys.contains_key(key_id) {
            return Err(CodecError::BadKeys(format!(
                "active key {key_id:?} is not among the keys"
            )));
        }
        self.active = key_id.to_string();
        Ok(self)
    }

    /// A fresh random key, as 64 hex characters (for `tether` key files).
    pub fn generate_key_hex() -> String {
        let key = Key::<Aes256Gcm>::generate();
        key.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Parses keys: lines (or `;`-separated entries) of `KEY_ID = 64 hex chars`, optionally
    /// `active = KEY_ID` (default: the first key). `#` starts a comment.
    pub fn parse(text: &str) -> Result<Self, CodecError> {
        let mut keys: Vec<(String, [u8; 32])> = Vec::new();
        let mut active = None;
        // Comments go first: a comment may hold anything, `;` included.
        let entries = text.lines().enumerate().flat_map(|(n, raw)| {
            let line = raw.split('#').next().unwrap_or("");
            line.split(';').map(move |entry| (n + 1, entry.trim()))
        });
        for (line_number, line) in entries {
            if line.is_empty() {
                continue;
            }
            let Some((k, v)) = line.split_once('=') else {
                // The line is not quoted: it may be (part of) a secret.
                return Err(CodecError::BadKeys(format!(
                    "line {line_number} is not `KEY_ID = 64 hex characters` (nor `active = KEY_ID`)"
                )));
            };
            let (k, v) = (k.trim(), v.trim());
            if k == "active" {
                active = Some(v.to_string());
            } else {
                tether_core::types::validate_name("key id", k)
                    .map_err(|e| CodecError::BadKeys(e.to_string()))?;
                keys.push((k.to_string(), parse_hex_key(k, v)?));
            }
        }
        let Some((first_id, first_key)) = keys.first().cloned() else {
            return Err(CodecError::BadKeys("no keys found".into()));
        };
        let mut codec = AesGcmCodec::new(&first_id, first_key);
        for (id, key) in keys.into_iter().skip(1) {
            codec = codec.with_key(&id, key);
        }
        match active {
            Some(a) => codec.activate(&a),
            None => Ok(codec),
        }
    }

    /// Reads keys from a file (see [`AesGcmCodec::parse`]).
    pub fn from_file(path: &Path) -> Result<Self, CodecError> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            CodecError::BadKeys(format!("could not read key file {}: {e}", path.display()))
        })?;
        Self::parse(&text)
    }

    /// Reads keys from an environment variable (see [`AesGcmCodec::parse`]).
    pub fn from_env(var: &str) -> Result<Self, CodecError> {
        let text = std::env::var(var)
            .map_err(|_| CodecError::BadKeys(format!("environment variable {var} is not set")))?;
        Self::parse(&text)
    }

    /// The key new payloads are encrypted with.
    pub fn active_key_id(&self) -> &str {
        &self.active
    }

    /// Every key id it holds (it decrypts with any of them), sorted.
    pub fn key_ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self.keys.keys().cloned().collect();
        ids.sort();
        ids
    }
}

impl PayloadCodec for AesGcmCodec {
    fn encode(&self, payload: Payload) -> Result<Payload, CodecError> {
        let cipher = &self.keys[&self.active];
        let nonce = Nonce::generate();
        let plain = payload.encode_to_vec();
        let sealed = cipher
            .encrypt(&nonce, plain.as_slice())
            .map_err(|_| CodecError::Encrypt(self.active.clone()))?;
        let mut data = nonce.to_vec();
        data.extend_from_slice(&sealed);
        let mut metadata = BTreeMap::new();
        metadata.insert(
            tether_wire::ENCODING_KEY.to_string(),
            ENCRYPTED_ENCODING.as_bytes().to_vec(),
        );
        metadata.insert(KEY_ID_KEY.to_string(), self.active.as_bytes().to_vec());
        Ok(Payload { metadata, data })
    }

    fn decode(&self, payload: Payload) -> Result<Payload, CodecError> {
        if encoding_of(&payload) != ENCRYPTED_ENCODING {
            return Ok(payload);
        }
        let key_id = payload
            .metadata
            .get(KEY_ID_KEY)
            .map(|v| String::from_utf8_lossy(v).into_owned())
            .unwrap_or_default();
        let Some(cipher) = self.keys.get(&key_id) else {
            return Err(CodecError::UnknownKey(key_id));
        };
        if payload.data.len() < NONCE_LEN {
            return Err(CodecError::Decrypt(key_id));
        }
        let (nonce, sealed) = payload.data.split_at(NONCE_LEN);
        let nonce = Nonce::try_from(nonce).map_err(|_| CodecError::Decrypt(key_id.clone()))?;
        let plain = cipher
            .decrypt(&nonce, sealed)
            .map_err(|_| CodecError::Decrypt(key_id.clone()))?;
        Payload::decode(plain.as_slice()).map_err(|_| CodecError::Decrypt(key_id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{json_payload, DataConverter};
    use std::sync::Arc;

    fn key(b: u8) -> [u8; 32] {
        [b; 32]
    }

    #[test]
    fn round_trip_hides_the_plaintext() {
        let codec = AesGcmCodec::new("k1", key(1));
        let plain = json_payload(b"\"secret-marker\"".to_vec());
        let sealed = codec.encode(plain.clone()).unwrap();
        assert!(!sealed.data.windows(13).any(|w| w == b"secret-marker"));
        assert_eq!(crate::codec::encoding_of(&sealed), ENCRYPTED_ENCODING);
        assert_eq!(sealed.metadata[KEY_ID_KEY], b"k1");
        // A fresh nonce each time: the same value never encrypts the same way twice.
        assert_ne!(codec.encode(plain.clone()).unwrap().data, sealed.data);
        assert_eq!(codec.decode(sealed).unwrap(), plain);
    }

    #[test]
    fn rotation_keeps_old_payloads_readable() {
        let old = AesGcmCodec::new("k1", key(1));
        let sealed = old.encode(json_payload(b"1".to_vec())).unwrap();
        let rotated = AesGcmCodec::new("k1", key(1))
            .with_key("k2", key(2))
            .activate("k2")
            .unwrap();
        assert_eq!(rotated.decode(sealed).unwrap().data, b"1");
        let new = rotated.encode(json_payload(b"2".to_vec())).unwrap();
        assert_eq!(new.metadata[KEY_ID_KEY], b"k2");
    }

    #[test]
    fn missing_or_wrong_key_is_a_clear_error() {
        let sealed = AesGcmCodec::new("k1", key(1))
            .encode(json_payload(b"1".to_vec()))
            .unwrap();
        let other = AesGcmCodec::new("k9", key(9));
        let err = other.decode(sealed.clone()).unwrap_err();
        assert!(err.to_string().contains("\"k1\""), "{err}");
        let impostor = AesGcmCodec::new("k1", key(7));
        let err = impostor.decode(sealed).unwrap_err();
        assert!(
            err.to_string()
                .contains("could not be decrypted with key \"k1\""),
            "{err}"
        );
    }

    #[test]
    fn key_files_parse_and_refuse_bad_keys() {
        let hex1 = "11".repeat(32);
        let hex2 = "22".repeat(32);
        let codec = AesGcmCodec::parse(&format!("# keys\nk1 = {hex1}\nk2 = {hex2}\nactive = k2\n"))
            .unwrap();
        assert_eq!(codec.active_key_id(), "k2");
        assert!(AesGcmCodec::parse("k1 = abc")
            .unwrap_err()
            .to_string()
            .contains("64 hex"));
        assert!(AesGcmCodec::parse(&format!("k1 = {hex1}\nactive = k3")).is_err());
        assert!(AesGcmCodec::parse("").is_err());
        assert_eq!(AesGcmCodec::generate_key_hex().len(), 64);
        // Through a converter: JSON then encryption, and back.
        let dc = DataConverter::default().with_codec(Arc::new(codec));
        let p = dc.to_payload(&vec![1, 2]).unwrap();
        assert_eq!(crate::codec::encoding_of(&p), ENCRYPTED_ENCODING);
        let v: Vec<i32> = dc.from_payload(Some(&p)).unwrap();
        assert_eq!(v, vec![1, 2]);
    }
}

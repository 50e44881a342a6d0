//! Properties the fuzz targets in `fuzz/` check, kept here so `cargo test` also runs them on
//! random inputs: parsing never panics, canonical forms round-trip, and decoding hostile payloads
//! fails cleanly.

use crate::caps::Requirements;
use crate::codec::{AesGcmCodec, DataConverter, ENCRYPTED_ENCODING, KEY_ID_KEY};
use prost::Message;
use std::sync::Arc;
use tether_wire::pb;

/// Requirements text: parsing never panics, and a parsed value's canonical form parses back to
/// the same canonical form.
pub fn requirements(text: &str) {
    if let Ok(r) = Requirements::parse(text) {
        let canonical = r.to_string();
        let again = Requirements::parse(&canonical)
            .unwrap_or_else(|e| panic!("canonical form {canonical:?} does not parse: {e}"));
        assert_eq!(again.to_string(), canonical);
    }
}

/// Bytes as an encrypted payload, and as a history event decoded through the codec chain:
/// errors, never panics, never plaintext from nothing.
pub fn payload_decode(data: &[u8]) {
    let codec = AesGcmCodec::new("k1", [5u8; 32]);
    let dc = DataConverter::default().with_codec(Arc::new(codec));
    let mut metadata = std::collections::BTreeMap::new();
    metadata.insert(
        tether_wire::ENCODING_KEY.to_string(),
        ENCRYPTED_ENCODING.as_bytes().to_vec(),
    );
    metadata.insert(KEY_ID_KEY.to_string(), b"k1".to_vec());
    let forged = pb::Payload {
        metadata,
        data: data.to_vec(),
    };
    // Without the key's authentication tag, nothing decrypts.
    assert!(dc.decode(forged).is_err());
    if let Ok(mut event) = pb::HistoryEvent::decode(data) {
        let _ = dc.decode_events(std::slice::from_mut(&mut event));
    }
    let _ = crate::codec::from_payload::<serde_json::Value>(Some(&pb::Payload {
        metadata: Default::default(),
        data: data.to_vec(),
    }));
}

#[cfg(test)]
mod tests {
    /// A small deterministic generator (no extra dependency), biased towards the grammar's
    /// characters so that many inputs get past the first token.
    struct Gen(u64);
    impl Gen {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
    }

    #[test]
    fn random_requirement_texts() {
        const PIECES: &[&str] = &[
            "gpu.count",
            "gpu.memory",
            "gpu.name",
            "gpu.compute",
            "label.zone",
            "credential",
            "network",
            "resource.x",
            "host.memory",
            "prefer ",
            ">=",
            "<=",
            "=",
            "!=",
            "~",
            ">",
            "<",
            "40GiB",
            "8.0",
            "2",
            "a100",
            ",",
            " ",
            ":5",
            "MiB",
            "x",
            "..",
            "é",
            "\"",
        ];
        let mut g = Gen(0x9e37_79b9_7f4a_7c15);
        for _ in 0..20_000 {
            let n = (g.next() % 12) as usize;
            let text: String = (0..n)
                .map(|_| PIECES[(g.next() as usize) % PIECES.len()])
                .collect();
            super::requirements(&text);
        }
    }

    #[test]
    fn random_payload_bytes() {
        let mut g = Gen(0x1234_5678_9abc_def1);
        for _ in 0..5_000 {
            let n = (g.next() % 96) as usize;
            let bytes: Vec<u8> = (0..n).map(|_| g.next() as u8).collect();
            super::payload_decode(&bytes);
        }
    }
}

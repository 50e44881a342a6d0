//! A compression codec (LZ4). Put it before the encryption codec: ciphertext does not compress.
//! Payloads smaller than a threshold, or that do not shrink, pass through unchanged.

use super::payload::{encoding_of, CodecError, PayloadCodec};
use prost::Message;
use std::collections::BTreeMap;
use tether_wire::pb::Payload;

/// Encoding name of compressed payloads.
pub const COMPRESSED_ENCODING: &str = "binary/lz4";

/// LZ4 compression of whole payloads (metadata included).
#[derive(Debug, Clone)]
pub struct CompressionCodec {
    /// Payloads smaller than this many bytes are left alone. Default 256.
    pub min_size: usize,
}

impl Default for CompressionCodec {
    fn default() -> Self {
        CompressionCodec { min_size: 256 }
    }
}

impl PayloadCodec for CompressionCodec {
    fn encode(&self, payload: Payload) -> Result<Payload, CodecError> {
        if payload.data.len() < self.min_size {
            return Ok(payload);
        }
        let packed = lz4_flex::compress_prepend_size(&payload.encode_to_vec());
        if packed.len() >= payload.data.len() {
            return Ok(payload);
        }
        let mut metadata = BTreeMap::new();
        metadata.insert(
            tether_wire::ENCODING_KEY.to_string(),
            COMPRESSED_ENCODING.as_bytes().to_vec(),
        );
        Ok(Payload {
            metadata,
            data: packed,
        })
    }

    fn decode(&self, payload: Payload) -> Result<Payload, CodecError> {
        if encoding_of(&payload) != COMPRESSED_ENCODING {
            return Ok(payload);
        }
        let bytes = lz4_flex::decompress_size_prepended(&payload.data)
            .map_err(|e| CodecError::Corrupt(format!("lz4 payload does not decompress: {e}")))?;
        Payload::decode(bytes.as_slice())
            .map_err(|e| CodecError::Corrupt(format!("decompressed payload does not decode: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{AesGcmCodec, DataConverter};
    use std::sync::Arc;

    #[test]
    fn compresses_then_encrypts_and_back() {
        let dc = DataConverter::default()
            .with_codec(Arc::new(CompressionCodec::default()))
            .with_codec(Arc::new(AesGcmCodec::new("k1", [3u8; 32])));
        let big = "abc".repeat(10_000);
        let p = dc.to_payload(&big).unwrap();
        assert!(
            p.data.len() < 2_000,
            "compressed before encryption: {} bytes",
            p.data.len()
        );
        let back: String = dc.from_payload(Some(&p)).unwrap();
        assert_eq!(back, big);
        // Small payloads are left alone by the compressor.
        let small = CompressionCodec::default()
            .encode(crate::codec::json_payload(b"1".to_vec()))
            .unwrap();
        assert_eq!(
            crate::codec::encoding_of(&small),
            crate::codec::JSON_ENCODING
        );
        let bad = Payload {
            metadata: [(
                tether_wire::ENCODING_KEY.to_string(),
                COMPRESSED_ENCODING.as_bytes().to_vec(),
            )]
            .into(),
            data: vec![1, 2, 3],
        };
        assert!(CompressionCodec::default().decode(bad).is_err());
    }
}

//! The data converter: turns Rust values into payloads and back, on clients and workers only.
//! The server never calls into this module. JSON is the default encoding; raw bytes pass through
//! as `binary/plain`. A chain of payload codecs (e.g. [`AesGcmCodec`]) can be applied on top: the
//! SDK runs it at its edge, on every payload it sends and receives, so workflow and activity code
//! and the server's storage only ever see, respectively, plain and encoded payloads.

mod aes;
mod compress;
mod converter;
mod payload;
mod walk;

pub use aes::AesGcmCodec;
pub use compress::{CompressionCodec, COMPRESSED_ENCODING};
pub use converter::DataConverter;
pub use payload::{
    binary_payload, display_payload, encoding_of, from_payload, json_payload, to_payload,
    CodecError, ConvertError, PayloadCodec, BINARY_ENCODING, ENCRYPTED_ENCODING, JSON_ENCODING,
    KEY_ID_KEY,
};
pub use walk::event_payloads_mut;

#[cfg(test)]
mod tests {
    use super::*;
    use tether_wire::ENCODING_KEY;

    #[test]
    fn json_round_trip() {
        let p = to_payload(&vec![1, 2, 3]).unwrap();
        assert_eq!(encoding_of(&p), JSON_ENCODING);
        let v: Vec<i32> = from_payload(Some(&p)).unwrap();
        assert_eq!(v, vec![1, 2, 3]);
    }

    #[test]
    fn missing_payload_is_null() {
        let v: Option<String> = from_payload(None).unwrap();
        assert_eq!(v, None);
        from_payload::<()>(None).unwrap();
    }

    #[test]
    fn wrong_type_is_a_clear_error() {
        let p = to_payload("text").unwrap();
        let err = from_payload::<u32>(Some(&p)).unwrap_err();
        assert!(err.to_string().contains("could not decode"), "{err}");
    }

    #[test]
    fn unknown_encoding_is_refused() {
        let mut p = binary_payload(vec![1]);
        p.metadata
            .insert(ENCODING_KEY.into(), b"binary/encrypted".to_vec());
        assert!(matches!(
            from_payload::<Vec<u8>>(Some(&p)),
            Err(ConvertError::UnknownEncoding(_))
        ));
    }
}

//! The data converter: plain payload conversion plus a chain of codecs.

use super::payload::{from_payload, to_payload, CodecError, ConvertError, PayloadCodec};
use serde::{de::DeserializeOwned, Serialize};
use std::sync::Arc;
use tether_wire::pb::Payload;

/// JSON payload conversion plus a chain of codecs. Cheap to clone.
#[derive(Clone, Default)]
pub struct DataConverter {
    codecs: Vec<Arc<dyn PayloadCodec>>,
    pub(super) encode_failures: bool,
}

impl std::fmt::Debug for DataConverter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataConverter")
            .field("codecs", &self.codecs.len())
            .finish()
    }
}

impl DataConverter {
    /// Adds a codec; codecs encode in the order added and decode in reverse.
    pub fn with_codec(mut self, codec: Arc<dyn PayloadCodec>) -> Self {
        self.codecs.push(codec);
        self
    }

    /// Also encodes failure messages and error types (which the server otherwise reads: they
    /// show in `describe` and logs). The server then cannot match `non_retryable_error_types`
    /// against the error type; the `non_retryable` flag still works.
    pub fn encode_failure_attributes(mut self, on: bool) -> Self {
        self.encode_failures = on;
        self
    }

    /// True when there is no codec (payloads are sent as converted).
    pub fn is_plain(&self) -> bool {
        self.codecs.is_empty()
    }

    /// Runs the codec chain forwards.
    pub fn encode(&self, mut payload: Payload) -> Result<Payload, CodecError> {
        for c in &self.codecs {
            payload = c.encode(payload)?;
        }
        Ok(payload)
    }

    /// Runs the codec chain backwards.
    pub fn decode(&self, mut payload: Payload) -> Result<Payload, CodecError> {
        for c in self.codecs.iter().rev() {
            payload = c.decode(payload)?;
        }
        Ok(payload)
    }

    /// Value -> JSON payload -> codecs.
    pub fn to_payload<T: Serialize + ?Sized>(&self, value: &T) -> Result<Payload, ConvertError> {
        Ok(self.encode(to_payload(value)?)?)
    }

    /// Codecs -> JSON payload -> value.
    pub fn from_payload<T: DeserializeOwned>(
        &self,
        payload: Option<&Payload>,
    ) -> Result<T, ConvertError> {
        match payload {
            None => from_payload(None),
            Some(p) => from_payload(Some(&self.decode(p.clone())?)),
        }
    }
}

//! Encode once, share everywhere.
//!
//! A publication fanned out to 10 000 subscribers must be serialized once per wire format, not 10 000 times.
//! Each [`Publication`] carries a [`FrameCache`]: the first transport writer that needs the SSE (or, later,
//! WebSocket) bytes encodes them, every other writer clones the `Bytes` handle (a reference count, no copy).
//! Adding a wire format is adding a module here with an `encode` function and a slot in the cache.

use std::sync::OnceLock;

use bytes::Bytes;

use crate::log::Record;

pub mod centrifugo;
pub mod sse;

/// One slot per wire format.
#[derive(Debug, Default)]
pub struct FrameCache {
    sse: OnceLock<Bytes>,
    centrifugo_json: OnceLock<Bytes>,
    centrifugo_protobuf: OnceLock<Bytes>,
}

/// A publication as it travels from the hub to transports: the stored record and its encodings.
#[derive(Debug)]
pub struct Publication {
    pub record: Record,
    frames: FrameCache,
}

impl Publication {
    pub fn new(record: Record) -> Self {
        Publication {
            record,
            frames: FrameCache::default(),
        }
    }

    /// The complete SSE event, encoded on first use.
    pub fn sse(&self) -> Bytes {
        self.frames
            .sse
            .get_or_init(|| sse::encode(&self.record))
            .clone()
    }

    /// The Centrifugo publication push for `channel` in `codec`: cached for the canonical channel (the
    /// common case), encoded on demand for an alternate topic.
    pub fn centrifugo_push(&self, channel: &str, codec: centrifugo::Codec) -> Bytes {
        if channel != self.record.channel() {
            return centrifugo::push(channel, &self.record, codec);
        }
        let slot = match codec {
            centrifugo::Codec::Json => &self.frames.centrifugo_json,
            centrifugo::Codec::Protobuf => &self.frames.centrifugo_protobuf,
        };
        slot.get_or_init(|| centrifugo::push(channel, &self.record, codec))
            .clone()
    }
}

//! Length-prefixed bincode frames with explicit size limits.
//!
//! A frame is a 4-byte big-endian payload length followed by the bincode payload. The length is
//! checked against the caller's limit *before* any byte of the payload is buffered, and bincode
//! itself decodes under a hard allocation ceiling, so no peer can make a decoder allocate more
//! than [`MAX_FRAME_LEN_CEILING`] bytes, whatever the frame claims.

use bincode::config::{self, Configuration, Limit, LittleEndian, Varint};
use bincode::{Decode, Encode};
use bytes::{Buf, BufMut, BytesMut};

/// Size of the length prefix in front of every frame.
pub const LENGTH_PREFIX_LEN: usize = 4;

/// Hard upper bound on any frame's payload, and on what bincode may allocate while decoding one.
/// Runtime limits (`max_frame_len` arguments) may only be smaller. 17 MiB leaves room for the
/// largest WebSocket message the edge can be configured to carry (16 MiB) plus its framing.
pub const MAX_FRAME_LEN_CEILING: usize = 17 * 1024 * 1024;

/// Default limit for head frames (exchange heads, replies, control and pairing messages).
/// 64 KiB holds any realistic set of HTTP headers several times over; hyper's own default cap on
/// a request head is 400 KiB of buffer but ~100 headers, and ACS sends about twenty.
pub const DEFAULT_MAX_HEAD_LEN: usize = 64 * 1024;

type WireConfig = Configuration<LittleEndian, Varint, Limit<MAX_FRAME_LEN_CEILING>>;

fn wire_config() -> WireConfig {
    config::standard().with_limit::<MAX_FRAME_LEN_CEILING>()
}

/// Why a frame could not be encoded.
#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    /// The encoded payload is larger than the frame limit the peer enforces.
    #[error("frame of {len} bytes exceeds the {max}-byte limit")]
    TooLarge {
        /// Encoded payload length.
        len: usize,
        /// The limit it broke.
        max: usize,
    },
    /// bincode refused the value.
    #[error("encoding failed: {0}")]
    Bincode(#[from] bincode::error::EncodeError),
}

/// Why a frame from the peer was rejected. Every variant means "reset this stream".
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// The length prefix announces more bytes than the limit for this frame.
    #[error("peer announced a {len}-byte frame; the limit is {max}")]
    TooLarge {
        /// Announced payload length.
        len: usize,
        /// The limit it broke.
        max: usize,
    },
    /// The payload is not a valid encoding of the expected message.
    #[error("malformed frame: {0}")]
    Malformed(#[from] bincode::error::DecodeError),
    /// The payload decoded but bytes were left over, which a well-formed peer never sends.
    #[error("malformed frame: {0} trailing bytes")]
    TrailingBytes(usize),
    /// The stream ended in the middle of a frame.
    #[error("stream ended inside a frame ({0} bytes buffered)")]
    Truncated(usize),
}

/// Appends `msg` as one frame to `dst`, refusing payloads longer than `max_len`.
pub fn encode_frame<T: Encode>(msg: &T, max_len: usize, dst: &mut BytesMut) -> Result<(), EncodeError> {
    let start = dst.len();
    dst.put_u32(0);
    let mut writer = BytesMutWriter(dst);
    let result = bincode::encode_into_writer(msg, &mut writer, wire_config());
    let len = dst.len() - start - LENGTH_PREFIX_LEN;
    if let Err(err) = result {
        dst.truncate(start);
        return Err(err.into());
    }
    let max = max_len.min(MAX_FRAME_LEN_CEILING);
    if len > max {
        dst.truncate(start);
        return Err(EncodeError::TooLarge { len, max });
    }
    // `len <= MAX_FRAME_LEN_CEILING < u32::MAX`, so the cast is lossless.
    let prefix = (len as u32).to_be_bytes();
    if let Some(slot) = dst.get_mut(start..start + LENGTH_PREFIX_LEN) {
        slot.copy_from_slice(&prefix);
    }
    Ok(())
}

/// Decodes one complete payload (without its length prefix). All bytes must be consumed.
pub fn decode_payload<T: Decode<()>>(payload: &[u8]) -> Result<T, DecodeError> {
    let (value, used) = bincode::decode_from_slice(payload, wire_config())?;
    if used != payload.len() {
        return Err(DecodeError::TrailingBytes(payload.len() - used));
    }
    Ok(value)
}

/// Reads the payload length from a length prefix and checks it against `max_len`.
pub fn check_frame_len(prefix: [u8; LENGTH_PREFIX_LEN], max_len: usize) -> Result<usize, DecodeError> {
    let len = u32::from_be_bytes(prefix) as usize;
    let max = max_len.min(MAX_FRAME_LEN_CEILING);
    if len > max {
        return Err(DecodeError::TooLarge { len, max });
    }
    Ok(len)
}

/// Incremental decoder for a stream of frames arriving in arbitrary chunks.
///
/// Feed it bytes with [`FrameDecoder::decode`]; it returns `Ok(None)` until a whole frame is
/// buffered. It rejects an oversized frame as soon as the prefix is seen.
#[derive(Debug, Clone, Copy)]
pub struct FrameDecoder {
    max_len: usize,
}

impl FrameDecoder {
    /// A decoder that accepts payloads of at most `max_len` bytes (capped by the ceiling).
    pub fn new(max_len: usize) -> Self {
        Self { max_len: max_len.min(MAX_FRAME_LEN_CEILING) }
    }

    /// The payload limit this decoder enforces.
    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// Takes one frame off the front of `src` if it is complete.
    pub fn decode<T: Decode<()>>(&self, src: &mut BytesMut) -> Result<Option<T>, DecodeError> {
        let Some(prefix) = src.get(..LENGTH_PREFIX_LEN) else {
            return Ok(None);
        };
        let mut raw = [0u8; LENGTH_PREFIX_LEN];
        raw.copy_from_slice(prefix);
        let len = check_frame_len(raw, self.max_len)?;
        let total = LENGTH_PREFIX_LEN + len;
        if src.len() < total {
            src.reserve(total - src.len());
            return Ok(None);
        }
        src.advance(LENGTH_PREFIX_LEN);
        let payload = src.split_to(len);
        decode_payload(&payload).map(Some)
    }

    /// Called when the stream ends: leftover bytes mean the peer stopped inside a frame.
    pub fn decode_eof<T: Decode<()>>(&self, src: &mut BytesMut) -> Result<Option<T>, DecodeError> {
        match self.decode(src)? {
            Some(frame) => Ok(Some(frame)),
            None if src.is_empty() => Ok(None),
            None => Err(DecodeError::Truncated(src.len())),
        }
    }
}

struct BytesMutWriter<'a>(&'a mut BytesMut);

impl bincode::enc::write::Writer for BytesMutWriter<'_> {
    fn write(&mut self, bytes: &[u8]) -> Result<(), bincode::error::EncodeError> {
        self.0.extend_from_slice(bytes);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::messages::*;

    fn sample_head() -> ExchangeHead {
        ExchangeHead {
            request_id: 42,
            kind: ExchangeKind::Http,
            method: "POST".into(),
            path_and_query: "/api/callbacks/ctx?x=1&y=%20".into(),
            headers: vec![("content-type".into(), b"application/json".to_vec()), ("x-dup".into(), vec![1, 2, 255])],
            client_addr: "203.0.113.9:5555".into(),
            affinity_key: Some("corr-1".into()),
        }
    }

    fn frame<T: Encode>(msg: &T) -> BytesMut {
        let mut buf = BytesMut::new();
        encode_frame(msg, DEFAULT_MAX_HEAD_LEN, &mut buf).unwrap();
        buf
    }

    #[test]
    fn every_message_type_round_trips() {
        let dec = FrameDecoder::new(DEFAULT_MAX_HEAD_LEN);
        let mut buf = frame(&sample_head());
        assert_eq!(dec.decode::<ExchangeHead>(&mut buf).unwrap(), Some(sample_head()));
        assert!(buf.is_empty());

        let frames = vec![
            WsFrame::Text(b"{\"kind\":\"AudioData\"}".to_vec()),
            WsFrame::Binary(vec![0, 1, 2, 255]),
            WsFrame::Ping(b"p".to_vec()),
            WsFrame::Pong(vec![]),
            WsFrame::Close(Some(CloseFrame { code: 4000, reason: "bye".into() })),
            WsFrame::Close(None),
        ];
        let mut buf = BytesMut::new();
        for f in &frames {
            encode_frame(f, DEFAULT_MAX_HEAD_LEN, &mut buf).unwrap();
        }
        for f in &frames {
            assert_eq!(dec.decode::<WsFrame>(&mut buf).unwrap().as_ref(), Some(f));
        }
        assert_eq!(dec.decode_eof::<WsFrame>(&mut buf).unwrap(), None);

        let reply = HttpReply::Failed(Failure { kind: FailureKind::BotTimeout, detail: "slow".into() });
        assert_eq!(dec.decode::<HttpReply>(&mut frame(&reply)).unwrap(), Some(reply));
        let renew = ControlMessage::Renewed(RenewOutcome::Issued { cert_der: vec![1, 2, 3] });
        assert_eq!(dec.decode::<ControlMessage>(&mut frame(&renew)).unwrap(), Some(renew));
        let pair = PairResponse::Refused(PairRefusal::Spent);
        assert_eq!(dec.decode::<PairResponse>(&mut frame(&pair)).unwrap(), Some(pair));
    }

    #[test]
    fn a_frame_split_at_every_byte_decodes_only_when_complete() {
        let dec = FrameDecoder::new(DEFAULT_MAX_HEAD_LEN);
        let whole = frame(&sample_head());
        for cut in 0..whole.len() {
            let mut partial = BytesMut::from(&whole[..cut]);
            assert_eq!(dec.decode::<ExchangeHead>(&mut partial).unwrap(), None, "cut at {cut}");
            partial.extend_from_slice(&whole[cut..]);
            assert_eq!(dec.decode::<ExchangeHead>(&mut partial).unwrap(), Some(sample_head()));
        }
    }

    #[test]
    fn truncated_stream_is_an_error_at_eof() {
        let dec = FrameDecoder::new(DEFAULT_MAX_HEAD_LEN);
        let whole = frame(&sample_head());
        let mut partial = BytesMut::from(&whole[..whole.len() - 1]);
        assert!(matches!(dec.decode_eof::<ExchangeHead>(&mut partial), Err(DecodeError::Truncated(_))));
    }

    #[test]
    fn oversized_frames_are_refused_from_the_prefix_alone() {
        let dec = FrameDecoder::new(1024);
        let mut buf = BytesMut::new();
        buf.put_u32(1025);
        assert!(matches!(dec.decode::<WsFrame>(&mut buf), Err(DecodeError::TooLarge { len: 1025, max: 1024 })));
        let mut huge = BytesMut::new();
        huge.put_u32(u32::MAX);
        let uncapped = FrameDecoder::new(usize::MAX);
        assert!(matches!(uncapped.decode::<WsFrame>(&mut huge), Err(DecodeError::TooLarge { .. })));
    }

    #[test]
    fn encoding_over_the_limit_is_refused_and_leaves_the_buffer_untouched() {
        let mut buf = BytesMut::from(&b"keep"[..]);
        let err = encode_frame(&WsFrame::Binary(vec![0; 2000]), 1000, &mut buf).unwrap_err();
        assert!(matches!(err, EncodeError::TooLarge { max: 1000, .. }));
        assert_eq!(&buf[..], b"keep");
    }

    #[test]
    fn trailing_bytes_inside_a_frame_are_malformed() {
        let mut payload = frame(&WsFrame::Pong(vec![])).split_off(LENGTH_PREFIX_LEN).to_vec();
        payload.push(0);
        assert!(matches!(decode_payload::<WsFrame>(&payload), Err(DecodeError::TrailingBytes(1))));
    }

    #[test]
    fn a_length_claim_larger_than_the_frame_is_malformed_not_an_allocation() {
        // Variant Binary (1) claiming a u64::MAX-long byte vector, inside a 10-byte frame.
        let payload = [1u8, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff];
        assert!(decode_payload::<WsFrame>(&payload).is_err());
    }

    #[test]
    fn garbage_never_panics() {
        // Deterministic xorshift so failures reproduce; bounded in count.
        let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let dec = FrameDecoder::new(4096);
        for _ in 0..20_000 {
            let len = (next() % 64) as usize;
            let bytes: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            let _ = decode_payload::<ExchangeHead>(&bytes);
            let _ = decode_payload::<WsFrame>(&bytes);
            let _ = decode_payload::<ControlMessage>(&bytes);
            let _ = decode_payload::<PairRequest>(&bytes);
            let mut buf = BytesMut::from(&bytes[..]);
            let _ = dec.decode_eof::<HttpReply>(&mut buf);
        }
    }

    #[test]
    fn pair_request_debug_never_shows_the_secret() {
        let req = PairRequest { token_id: "abc".into(), secret: b"s3cr3t-bytes".to_vec(), csr_der: vec![1, 2] };
        let shown = format!("{req:?}");
        assert!(!shown.contains("s3cr3t") && !shown.contains("115"), "{shown}");
    }
}

//! Reading and writing [`relay_proto`] frames on tunnel streams.

use bincode::{Decode, Encode};
use bytes::BytesMut;
use relay_proto::codec::{LENGTH_PREFIX_LEN, check_frame_len};
use relay_proto::{DecodeError, EncodeError, FrameDecoder, decode_payload, encode_frame};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Why a frame could not be read.
#[derive(Debug, thiserror::Error)]
pub enum FrameReadError {
    /// The stream failed (reset by the peer, connection lost).
    #[error("stream read failed: {0}")]
    Io(#[from] std::io::Error),
    /// The peer sent a frame that breaks the protocol.
    #[error(transparent)]
    Decode(#[from] DecodeError),
}

/// Why a frame could not be written.
#[derive(Debug, thiserror::Error)]
pub enum FrameWriteError {
    /// The stream failed.
    #[error("stream write failed: {0}")]
    Io(#[from] std::io::Error),
    /// The message does not fit the frame limit.
    #[error(transparent)]
    Encode(#[from] EncodeError),
}

/// Reads exactly one frame, consuming no byte beyond it (the raw body that may follow stays in
/// the stream). Returns `Ok(None)` if the stream ended cleanly before the frame began.
pub async fn read_frame<T, R>(recv: &mut R, max_len: usize) -> Result<Option<T>, FrameReadError>
where
    T: Decode<()>,
    R: AsyncRead + Unpin + ?Sized,
{
    let mut prefix = [0u8; LENGTH_PREFIX_LEN];
    let mut filled = 0;
    while filled < LENGTH_PREFIX_LEN {
        let n = recv.read(prefix.get_mut(filled..).unwrap_or_default()).await?;
        if n == 0 {
            return if filled == 0 { Ok(None) } else { Err(DecodeError::Truncated(filled).into()) };
        }
        filled += n;
    }
    let len = check_frame_len(prefix, max_len)?;
    let mut payload = vec![0u8; len];
    recv.read_exact(&mut payload).await.map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => FrameReadError::Decode(DecodeError::Truncated(LENGTH_PREFIX_LEN)),
        _ => FrameReadError::Io(e),
    })?;
    Ok(Some(decode_payload(&payload)?))
}

/// Writes one frame.
pub async fn write_frame<T, W>(send: &mut W, msg: &T, max_len: usize) -> Result<(), FrameWriteError>
where
    T: Encode,
    W: AsyncWrite + Unpin + ?Sized,
{
    let mut buf = BytesMut::new();
    encode_frame(msg, max_len, &mut buf)?;
    send.write_all(&buf).await?;
    Ok(())
}

/// Reads a sequence of frames from a stream with one buffer, for streams that carry only frames
/// after their head (WebSocket sessions, the control stream).
#[derive(Debug)]
pub struct FrameReader {
    decoder: FrameDecoder,
    buf: BytesMut,
}

/// Read size for [`FrameReader`], allocated for every open call: a media frame (about 1 KiB of
/// JSON) fits four times over. Reads from a QUIC stream copy from memory, not from a socket, so a
/// larger chunk saves little; 16 KiB was half of an idle call's memory budget (measured with
/// relay-bench: 31-35 KiB per call before, on each side).
const READ_CHUNK: usize = 4 * 1024;

impl FrameReader {
    /// A reader that accepts frames of at most `max_len` payload bytes.
    pub fn new(max_len: usize) -> Self {
        Self { decoder: FrameDecoder::new(max_len), buf: BytesMut::with_capacity(READ_CHUNK) }
    }

    /// The next frame, or `Ok(None)` when the stream ended cleanly between frames.
    pub async fn next<T, R>(&mut self, recv: &mut R) -> Result<Option<T>, FrameReadError>
    where
        T: Decode<()>,
        R: AsyncRead + Unpin + ?Sized,
    {
        loop {
            if let Some(frame) = self.decoder.decode(&mut self.buf)? {
                return Ok(Some(frame));
            }
            if self.buf.capacity() - self.buf.len() < READ_CHUNK {
                self.buf.reserve(READ_CHUNK);
            }
            if recv.read_buf(&mut self.buf).await? == 0 {
                return Ok(self.decoder.decode_eof(&mut self.buf)?);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use relay_proto::WsFrame;

    #[tokio::test]
    async fn a_head_frame_is_read_without_consuming_the_body_after_it() {
        let mut wire = Vec::new();
        write_frame(&mut wire, &WsFrame::Ping(b"head".to_vec()), 1024).await.unwrap();
        wire.extend_from_slice(b"raw body bytes");
        let mut cursor = std::io::Cursor::new(wire);
        let head: WsFrame = read_frame(&mut cursor, 1024).await.unwrap().unwrap();
        assert_eq!(head, WsFrame::Ping(b"head".to_vec()));
        let mut rest = Vec::new();
        cursor.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, b"raw body bytes");
    }

    #[tokio::test]
    async fn a_stream_ending_mid_frame_is_truncated_and_an_empty_one_is_none() {
        let mut wire = Vec::new();
        write_frame(&mut wire, &WsFrame::Binary(vec![9; 100]), 1024).await.unwrap();
        wire.truncate(50);
        let err = read_frame::<WsFrame, _>(&mut std::io::Cursor::new(wire.clone()), 1024).await.unwrap_err();
        assert!(matches!(err, FrameReadError::Decode(DecodeError::Truncated(_))));
        let err = FrameReader::new(1024).next::<WsFrame, _>(&mut std::io::Cursor::new(wire)).await.unwrap_err();
        assert!(matches!(err, FrameReadError::Decode(DecodeError::Truncated(_))));
        let none = read_frame::<WsFrame, _>(&mut std::io::Cursor::new(Vec::new()), 1024).await.unwrap();
        assert!(none.is_none());
    }

    #[tokio::test]
    async fn an_oversized_frame_is_refused_before_its_payload_is_read() {
        let mut wire = Vec::new();
        write_frame(&mut wire, &WsFrame::Binary(vec![0; 2048]), 4096).await.unwrap();
        let err = read_frame::<WsFrame, _>(&mut std::io::Cursor::new(wire), 1024).await.unwrap_err();
        assert!(matches!(err, FrameReadError::Decode(DecodeError::TooLarge { .. })));
    }
}

//! The frame codec of the host<->kilnd protocol (see [`kiln_protocol::kilnd`]): a `u32` big-endian
//! length (kind byte + payload), a kind byte, then the payload.

use std::io;

use bytes::Bytes;
use kiln_protocol::kilnd::{FRAME_DATA, FRAME_END, FRAME_JSON, MAX_FRAME};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Size of the `Data` frames kilnd and the client send for file and stdin streams.
pub const DATA_CHUNK: usize = 64 * 1024;

/// Largest payload of one frame.
const MAX_PAYLOAD: usize = MAX_FRAME as usize - 1;

/// One decoded frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// A JSON message (not parsed yet).
    Json(Vec<u8>),
    /// Raw bytes of a data stream.
    Data(Bytes),
    /// End of a data stream.
    End,
}

impl Frame {
    /// Parses a JSON frame as `T`; any other kind of frame is an `InvalidData` error.
    pub fn parse<T: DeserializeOwned>(&self) -> io::Result<T> {
        match self {
            Frame::Json(v) => {
                serde_json::from_slice(v).map_err(|e| invalid(format!("bad JSON frame: {e}")))
            }
            Frame::Data(_) => Err(invalid("expected a JSON frame, got a data frame".into())),
            Frame::End => Err(invalid("expected a JSON frame, got an end frame".into())),
        }
    }
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

/// Reads one frame. `Ok(None)` on a clean end of stream between frames; a stream that ends
/// inside a frame is an `UnexpectedEof` error, an oversized or unknown frame `InvalidData`.
pub async fn read_frame<R: AsyncRead + Unpin + ?Sized>(r: &mut R) -> io::Result<Option<Frame>> {
    let mut header = [0u8; 5];
    // First byte separately so that EOF before it is a clean end.
    let n = r.read(&mut header[..1]).await?;
    if n == 0 {
        return Ok(None);
    }
    r.read_exact(&mut header[1..]).await?;
    let len = u32::from_be_bytes([header[0], header[1], header[2], header[3]]);
    if len == 0 {
        return Err(invalid("frame length 0".into()));
    }
    if len > MAX_FRAME {
        return Err(invalid(format!(
            "frame of {len} bytes exceeds the limit of {MAX_FRAME}"
        )));
    }
    let kind = header[4];
    let payload_len = (len - 1) as usize;
    match kind {
        FRAME_JSON => {
            let mut buf = vec![0u8; payload_len];
            r.read_exact(&mut buf).await?;
            Ok(Some(Frame::Json(buf)))
        }
        FRAME_DATA => {
            let mut buf = vec![0u8; payload_len];
            r.read_exact(&mut buf).await?;
            Ok(Some(Frame::Data(Bytes::from(buf))))
        }
        FRAME_END => {
            if payload_len != 0 {
                return Err(invalid("end frame with a payload".into()));
            }
            Ok(Some(Frame::End))
        }
        other => Err(invalid(format!("unknown frame kind {other}"))),
    }
}

/// Appends the encoding of one frame to `buf`.
fn encode_raw(buf: &mut Vec<u8>, kind: u8, payload: &[u8]) -> io::Result<()> {
    if payload.len() > MAX_PAYLOAD {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "frame payload too large",
        ));
    }
    buf.reserve(payload.len() + 5);
    buf.extend_from_slice(&((payload.len() + 1) as u32).to_be_bytes());
    buf.push(kind);
    buf.extend_from_slice(payload);
    Ok(())
}

/// Appends one JSON frame holding `value` to `buf` (to send several frames with one write).
/// Fails with `InvalidInput` if the message does not fit in a frame.
pub fn encode_json<T: Serialize + ?Sized>(buf: &mut Vec<u8>, value: &T) -> io::Result<()> {
    let payload =
        serde_json::to_vec(value).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    encode_raw(buf, FRAME_JSON, &payload)
}

/// Appends `data` as `Data` frames of at most [`DATA_CHUNK`] bytes to `buf`.
pub fn encode_data(buf: &mut Vec<u8>, data: &[u8]) {
    for chunk in data.chunks(DATA_CHUNK) {
        // Chunks are far below the frame limit.
        let _ = encode_raw(buf, FRAME_DATA, chunk);
    }
}

async fn write_raw<W: AsyncWrite + Unpin + ?Sized>(
    w: &mut W,
    kind: u8,
    payload: &[u8],
) -> io::Result<()> {
    let mut buf = Vec::with_capacity(payload.len() + 5);
    encode_raw(&mut buf, kind, payload)?;
    w.write_all(&buf).await
}

/// Writes one frame.
pub async fn write_frame<W: AsyncWrite + Unpin + ?Sized>(
    w: &mut W,
    frame: &Frame,
) -> io::Result<()> {
    match frame {
        Frame::Json(v) => write_raw(w, FRAME_JSON, v).await,
        Frame::Data(d) => write_data(w, d).await,
        Frame::End => write_end(w).await,
    }
}

/// Serializes `value` and writes it as one JSON frame.
pub async fn write_json<W: AsyncWrite + Unpin + ?Sized, T: Serialize + ?Sized>(
    w: &mut W,
    value: &T,
) -> io::Result<()> {
    let payload =
        serde_json::to_vec(value).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    write_raw(w, FRAME_JSON, &payload).await
}

/// Writes `data` as `Data` frames of at most [`DATA_CHUNK`] bytes (nothing for empty data).
pub async fn write_data<W: AsyncWrite + Unpin + ?Sized>(w: &mut W, data: &[u8]) -> io::Result<()> {
    for chunk in data.chunks(DATA_CHUNK) {
        write_raw(w, FRAME_DATA, chunk).await?;
    }
    Ok(())
}

/// Writes an `End` frame.
pub async fn write_end<W: AsyncWrite + Unpin + ?Sized>(w: &mut W) -> io::Result<()> {
    write_raw(w, FRAME_END, &[]).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn round_trip() -> io::Result<()> {
        let mut buf = Vec::new();
        write_json(&mut buf, &serde_json::json!({"op": "ping"})).await?;
        write_data(&mut buf, b"hello").await?;
        write_data(&mut buf, &[]).await?;
        write_end(&mut buf).await?;
        assert_eq!(&buf[..5], &[0, 0, 0, 14, 0]);
        let mut r = &buf[..];
        assert_eq!(
            read_frame(&mut r).await?,
            Some(Frame::Json(br#"{"op":"ping"}"#.to_vec()))
        );
        assert_eq!(
            read_frame(&mut r).await?,
            Some(Frame::Data(Bytes::from_static(b"hello")))
        );
        assert_eq!(read_frame(&mut r).await?, Some(Frame::End));
        assert_eq!(read_frame(&mut r).await?, None);
        Ok(())
    }

    #[tokio::test]
    async fn rejects_bad_frames() {
        let cases: &[&[u8]] = &[
            &[0, 0, 0, 0],                 // zero length
            &[0x7f, 0, 0, 0, 0],           // too large
            &[0, 0, 0, 1, 9],              // unknown kind
            &[0, 0, 0, 2, FRAME_END, 1],   // end with payload
            &[0, 0, 0, 10, FRAME_DATA, 1], // truncated
        ];
        for c in cases {
            let mut r = *c;
            assert!(read_frame(&mut r).await.is_err(), "{c:?}");
        }
    }
}

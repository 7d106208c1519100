//! The frame codec every Trellis stream protocol uses.
//!
//! A frame is `len: u32 (big endian) | version: u8 | payload`, where `len`
//! counts the version byte and the payload, and the payload is a postcard
//! encoded message. Every decoder is given a size limit and checks it against
//! the length prefix *before* reading the body, so a peer cannot make us
//! buffer more than the limit.
//!
//! The pure functions ([`encode`], [`decode`]) do no I/O; [`read_frame`] and
//! [`write_frame`] move frames over quinn streams.

use serde::Serialize;
use serde::de::DeserializeOwned;

/// Bytes before the payload: the length prefix and the version byte.
pub const HEADER_LEN: usize = 5;

/// Why a frame could not be encoded or decoded.
///
/// Every decode error is peer misbehaviour (or a bug on the other side); the
/// caller closes the stream's connection. Nothing has been applied to state.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("frame of {len} bytes exceeds the limit of {limit} bytes")]
    TooLarge { len: usize, limit: usize },
    #[error("frame has protocol version {got}, expected {expected}")]
    Version { got: u8, expected: u8 },
    #[error("empty frame (no version byte)")]
    Empty,
    #[error("malformed message: {0}")]
    Malformed(#[from] postcard::Error),
    #[error("stream ended in the middle of a frame")]
    Truncated,
    #[error("stream error: {0}")]
    Stream(String),
}

impl WireError {
    /// A short, stable label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            WireError::TooLarge { .. } => "too_large",
            WireError::Version { .. } => "version",
            WireError::Empty | WireError::Malformed(_) => "malformed",
            WireError::Truncated => "truncated",
            WireError::Stream(_) => "stream",
        }
    }
}

/// Encodes `msg` as one frame. Fails only if the message exceeds `limit`,
/// which means the sender built something its peer would refuse.
pub fn encode<T: Serialize>(version: u8, msg: &T, limit: usize) -> Result<Vec<u8>, WireError> {
    let mut buf = vec![0u8; HEADER_LEN];
    buf[4] = version;
    let mut buf = postcard::to_extend(msg, buf)?;
    finish(&mut buf, limit)?;
    Ok(buf)
}

/// Frames bytes produced by another codec (chitchat's) the same way.
pub fn encode_raw(version: u8, payload: &[u8], limit: usize) -> Result<Vec<u8>, WireError> {
    let mut buf = Vec::with_capacity(HEADER_LEN + payload.len());
    buf.extend_from_slice(&[0, 0, 0, 0, version]);
    buf.extend_from_slice(payload);
    finish(&mut buf, limit)?;
    Ok(buf)
}

fn finish(buf: &mut [u8], limit: usize) -> Result<(), WireError> {
    let len = buf.len() - 4;
    if len > limit {
        return Err(WireError::TooLarge { len, limit });
    }
    buf[..4].copy_from_slice(&(len as u32).to_be_bytes());
    Ok(())
}

/// Reads the length prefix and checks it against `limit`.
pub fn frame_len(prefix: [u8; 4], limit: usize) -> Result<usize, WireError> {
    let len = u32::from_be_bytes(prefix) as usize;
    if len > limit {
        return Err(WireError::TooLarge { len, limit });
    }
    if len == 0 {
        return Err(WireError::Empty);
    }
    Ok(len)
}

/// Splits a frame body (what follows the length prefix) into its payload,
/// checking the version.
pub fn payload(body: &[u8], version: u8) -> Result<&[u8], WireError> {
    match body.split_first() {
        None => Err(WireError::Empty),
        Some((&got, rest)) if got == version => Ok(rest),
        Some((&got, _)) => Err(WireError::Version {
            got,
            expected: version,
        }),
    }
}

/// Decodes one complete frame from the front of `buf`.
///
/// Returns the message and the number of bytes consumed, or
/// [`WireError::Truncated`] if `buf` holds less than one frame. Trailing
/// bytes inside the frame are an error: a frame carries exactly one message.
pub fn decode<T: DeserializeOwned>(
    buf: &[u8],
    version: u8,
    limit: usize,
) -> Result<(T, usize), WireError> {
    let prefix: [u8; 4] = buf
        .get(..4)
        .ok_or(WireError::Truncated)?
        .try_into()
        .expect("four bytes");
    let len = frame_len(prefix, limit)?;
    let body = buf.get(4..4 + len).ok_or(WireError::Truncated)?;
    let msg = decode_body(body, version)?;
    Ok((msg, 4 + len))
}

/// Decodes a frame body (version byte and payload).
pub fn decode_body<T: DeserializeOwned>(body: &[u8], version: u8) -> Result<T, WireError> {
    let (msg, rest) = postcard::take_from_bytes(payload(body, version)?)?;
    if !rest.is_empty() {
        return Err(WireError::Malformed(
            postcard::Error::DeserializeBadEncoding,
        ));
    }
    Ok(msg)
}

/// Reads one frame body from a stream. `Ok(None)` means the stream ended
/// cleanly at a frame boundary.
pub async fn read_frame(
    recv: &mut quinn::RecvStream,
    limit: usize,
) -> Result<Option<Vec<u8>>, WireError> {
    match read_len(recv, limit).await? {
        Some(len) => read_body(recv, len).await.map(Some),
        None => Ok(None),
    }
}

/// Reads a frame's length prefix: the length of the body that follows, or
/// `Ok(None)` if the stream ended cleanly before it. A stream carrying many
/// frames waits here between them.
pub async fn read_len(
    recv: &mut quinn::RecvStream,
    limit: usize,
) -> Result<Option<usize>, WireError> {
    let mut prefix = [0u8; 4];
    match recv.read_exact(&mut prefix).await {
        Ok(()) => {}
        Err(quinn::ReadExactError::FinishedEarly(0)) => return Ok(None),
        Err(quinn::ReadExactError::FinishedEarly(_)) => return Err(WireError::Truncated),
        Err(quinn::ReadExactError::ReadError(e)) => return Err(WireError::Stream(e.to_string())),
    }
    frame_len(prefix, limit).map(Some)
}

/// Reads a frame body of `len` bytes (from [`read_len`]), copying what
/// quinn received once into one allocation (not zeroed first: for a
/// megabyte chunk that is a pass over memory saved).
pub async fn read_body(recv: &mut quinn::RecvStream, len: usize) -> Result<Vec<u8>, WireError> {
    let mut body = Vec::with_capacity(len);
    while body.len() < len {
        match recv.read_chunk(len - body.len(), true).await {
            Ok(Some(chunk)) => body.extend_from_slice(&chunk.bytes),
            Ok(None) => return Err(WireError::Truncated),
            Err(e) => return Err(WireError::Stream(e.to_string())),
        }
    }
    Ok(body)
}

/// Reads a frame body of `body.len()` bytes (from [`read_len`]) into
/// `body`, a buffer the caller keeps and reuses.
pub async fn read_body_into(
    recv: &mut quinn::RecvStream,
    body: &mut [u8],
) -> Result<(), WireError> {
    match recv.read_exact(body).await {
        Ok(()) => Ok(()),
        Err(quinn::ReadExactError::FinishedEarly(_)) => Err(WireError::Truncated),
        Err(quinn::ReadExactError::ReadError(e)) => Err(WireError::Stream(e.to_string())),
    }
}

/// Reads and decodes one message; `Ok(None)` at a clean end of stream.
pub async fn read_msg<T: DeserializeOwned>(
    recv: &mut quinn::RecvStream,
    version: u8,
    limit: usize,
) -> Result<Option<T>, WireError> {
    match read_frame(recv, limit).await? {
        None => Ok(None),
        Some(body) => decode_body(&body, version).map(Some),
    }
}

/// Writes an encoded frame.
pub async fn write_frame(send: &mut quinn::SendStream, frame: &[u8]) -> Result<(), WireError> {
    send.write_all(frame)
        .await
        .map_err(|e| WireError::Stream(e.to_string()))
}

/// Encodes and writes one message.
pub async fn write_msg<T: Serialize>(
    send: &mut quinn::SendStream,
    version: u8,
    msg: &T,
    limit: usize,
) -> Result<(), WireError> {
    write_frame(send, &encode(version, msg, limit)?).await
}

/// Serde for a `Vec<u8>` as one run of bytes, with
/// `#[serde(with = "wire::bytes")]`: postcard encodes it exactly as a
/// `Vec<u8>` (a length, then the bytes), but copies it at once instead of
/// visiting it byte by byte, which matters for megabyte chunks.
pub mod bytes {
    use serde::de::{Deserializer, SeqAccess, Visitor};
    use serde::ser::Serializer;

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(v)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        d.deserialize_byte_buf(Bytes)
    }

    struct Bytes;

    impl<'de> Visitor<'de> for Bytes {
        type Value = Vec<u8>;

        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("bytes")
        }

        fn visit_bytes<E>(self, v: &[u8]) -> Result<Vec<u8>, E> {
            Ok(v.to_vec())
        }

        fn visit_byte_buf<E>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
            Ok(v)
        }

        /// Formats that write bytes as a list of numbers.
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u8>, A::Error> {
            let mut v = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1 << 20));
            while let Some(b) = seq.next_element()? {
                v.push(b);
            }
            Ok(v)
        }
    }
}

/// One request on a new bidirectional stream of `conn` and its answer:
/// writes `msg`, finishes the stream, reads one message back. `None`: the
/// peer closed the stream without answering.
pub async fn ask<Q: Serialize, R: DeserializeOwned>(
    conn: &quinn::Connection,
    version: u8,
    msg: &Q,
    limit: usize,
) -> Result<Option<R>, String> {
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
    write_msg(&mut send, version, msg, limit)
        .await
        .map_err(|e| e.to_string())?;
    send.finish().map_err(|e| e.to_string())?;
    read_msg::<R>(&mut recv, version, limit)
        .await
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use serde::Deserialize;

    use super::*;

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    enum Msg {
        Hello { name: String, seq: u64 },
        Data(Vec<u8>),
        Bye,
    }

    fn msg() -> impl Strategy<Value = Msg> {
        prop_oneof![
            (".{0,40}", any::<u64>()).prop_map(|(name, seq)| Msg::Hello { name, seq }),
            proptest::collection::vec(any::<u8>(), 0..300).prop_map(Msg::Data),
            Just(Msg::Bye),
        ]
    }

    proptest! {
        #[test]
        fn frames_round_trip(m in msg()) {
            let buf = encode(3, &m, 1 << 16).unwrap();
            let (back, used): (Msg, usize) = decode(&buf, 3, 1 << 16).unwrap();
            prop_assert_eq!(back, m);
            prop_assert_eq!(used, buf.len());
        }

        #[test]
        fn every_truncation_is_reported_not_misread(m in msg(), cut in 0usize..400) {
            let buf = encode(1, &m, 1 << 16).unwrap();
            let cut = cut.min(buf.len().saturating_sub(1));
            let err = decode::<Msg>(&buf[..cut], 1, 1 << 16).unwrap_err();
            prop_assert!(matches!(err, WireError::Truncated), "{err:?}");
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode::<Msg>(&bytes, 1, 256);
        }

        #[test]
        fn garbage_bodies_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode_body::<Msg>(&bytes, 1);
        }

        #[test]
        fn bytes_encode_as_a_vec_of_u8_does_and_read_back_from_either(
            data in proptest::collection::vec(any::<u8>(), 0..600),
        ) {
            let as_bytes = postcard::to_stdvec(&AsBytes(data.clone())).unwrap();
            prop_assert_eq!(&as_bytes, &postcard::to_stdvec(&data).unwrap());
            prop_assert_eq!(postcard::from_bytes::<AsBytes>(&as_bytes).unwrap().0, data.clone());
            prop_assert_eq!(postcard::from_bytes::<Vec<u8>>(&as_bytes).unwrap(), data);
        }

        #[test]
        fn garbage_never_panics_as_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = postcard::from_bytes::<AsBytes>(&bytes);
        }
    }

    #[derive(Debug, Serialize, Deserialize)]
    struct AsBytes(#[serde(with = "bytes")] Vec<u8>);

    #[test]
    fn bytes_in_a_self_describing_format_read_back_from_a_list_of_numbers() {
        let json = serde_json::to_string(&AsBytes(vec![1, 2, 255])).unwrap();
        assert_eq!(json, "[1,2,255]");
        assert_eq!(
            serde_json::from_str::<AsBytes>(&json).unwrap().0,
            [1, 2, 255]
        );
    }

    #[test]
    fn oversized_length_prefix_is_refused_before_reading_the_body() {
        let mut buf = (1_000_000u32).to_be_bytes().to_vec();
        buf.push(1);
        assert!(matches!(
            decode::<Msg>(&buf, 1, 1024),
            Err(WireError::TooLarge {
                len: 1_000_000,
                limit: 1024
            })
        ));
    }

    #[test]
    fn a_frame_of_another_version_is_refused() {
        let buf = encode(2, &Msg::Bye, 64).unwrap();
        assert!(matches!(
            decode::<Msg>(&buf, 1, 64),
            Err(WireError::Version {
                got: 2,
                expected: 1
            })
        ));
    }

    #[test]
    fn trailing_bytes_inside_a_frame_are_refused() {
        let mut body = vec![1u8];
        body.extend(postcard::to_stdvec(&Msg::Bye).unwrap());
        body.push(0);
        assert!(decode_body::<Msg>(&body, 1).is_err());
    }

    #[test]
    fn encoding_past_the_limit_fails() {
        let big = Msg::Data(vec![0; 100]);
        assert!(matches!(
            encode(1, &big, 50),
            Err(WireError::TooLarge { .. })
        ));
    }
}

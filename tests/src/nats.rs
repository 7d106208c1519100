//! A small client of the NATS text protocol, enough for the buffer
//! benchmark to put a NATS JetStream server beside the outage buffer:
//! connect, subscribe to an inbox, publish with a reply subject, and make
//! JetStream API requests. It needs nothing beyond tokio and serde_json, so
//! the baseline adds no client library of its own to what is measured.
//!
//! # Layout
//! - [`Decoder`]: pure; turns the bytes a server sends into [`ServerOp`]s,
//!   however the frames are split across reads.
//! - [`Client`]: the driver; one TCP connection, writes batched until
//!   [`Client::flush`].
//! - [`check_answer`], [`create_stream`], [`delete_stream`],
//!   [`create_pull_consumer`]: the JetStream API requests the benchmark
//!   makes, each checked for an error in the answer.

use std::net::SocketAddr;

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A control line (`INFO`, `MSG ...`) longer than this is taken for
/// garbage rather than waited for: a server's INFO is a few hundred bytes.
pub const MAX_CONTROL_LINE: usize = 64 * 1024;
/// A message announcing a larger payload is refused before anything is
/// allocated for it; NATS servers default to 1 MiB.
pub const MAX_PAYLOAD: usize = 64 << 20;
/// The sid of the client's one subscription, to its inbox.
const INBOX_SID: u64 = 1;

/// What can go wrong talking to a NATS server. Every variant but
/// [`NatsError::JetStream`] leaves the connection unusable.
#[derive(Debug, thiserror::Error)]
pub enum NatsError {
    /// The connection could not be made or failed.
    #[error("NATS connection: {0}")]
    Io(#[from] std::io::Error),
    /// The server closed the connection.
    #[error("the NATS server closed the connection; its log says why")]
    Closed,
    /// The server sent bytes that are not the NATS protocol.
    #[error("the NATS server sent a malformed frame: {0}")]
    Malformed(String),
    /// The server refused the connection or an operation (`-ERR`).
    #[error("the NATS server answered -ERR '{0}'")]
    Server(String),
    /// A JetStream request or publish was answered with an error (or a
    /// status such as 503, no responders); nothing of it took effect.
    #[error("JetStream refused {what}: {answer}")]
    JetStream {
        /// The request, e.g. "stream create".
        what: String,
        /// The error from the answer.
        answer: String,
    },
}

/// One operation from the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerOp {
    /// `INFO {json}`: the JSON text.
    Info(String),
    /// `MSG` or `HMSG`.
    Msg(Msg),
    Ping,
    Pong,
    /// `+OK` (only in verbose mode).
    Ok,
    /// `-ERR 'text'`: the text without its quotes.
    Err(String),
}

/// A message delivered to a subscription.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Msg {
    pub subject: String,
    pub sid: u64,
    pub reply: Option<String>,
    /// The header block of an `HMSG` (`NATS/1.0 ...\r\n...\r\n\r\n`);
    /// empty for a `MSG`.
    pub headers: Vec<u8>,
    pub payload: Vec<u8>,
}

impl Msg {
    /// The status code in the header block's first line (`NATS/1.0 404
    /// No Messages`), which the server uses for "no messages", "request
    /// timeout" and "no responders".
    pub fn status(&self) -> Option<u16> {
        let line = self.headers.split(|&b| b == b'\r').next()?;
        let line = std::str::from_utf8(line).ok()?;
        let rest = line.strip_prefix("NATS/1.0")?;
        rest.split_ascii_whitespace().next()?.parse().ok()
    }
}

/// Bytes from the server in, operations out. Holds a partial frame until
/// the rest of it has been pushed.
#[derive(Debug, Default)]
pub struct Decoder {
    buf: Vec<u8>,
    /// Bytes of `buf` before this are consumed.
    pos: usize,
}

impl Decoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds bytes read from the connection.
    pub fn push(&mut self, bytes: &[u8]) {
        // Drop what has been consumed once it is the larger part, so the
        // buffer neither grows without bound nor is shifted on every push.
        if self.pos > 0 && self.pos >= self.buf.len() / 2 {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// The next whole operation, or `None` until more bytes are pushed.
    /// After an error the stream cannot be resynchronised.
    pub fn next_op(&mut self) -> Result<Option<ServerOp>, NatsError> {
        let pending = &self.buf[self.pos..];
        let Some(eol) = pending.windows(2).position(|w| w == b"\r\n") else {
            if pending.len() > MAX_CONTROL_LINE {
                return Err(NatsError::Malformed(format!(
                    "no end of line within {MAX_CONTROL_LINE} bytes"
                )));
            }
            return Ok(None);
        };
        let line = std::str::from_utf8(&pending[..eol])
            .map_err(|_| NatsError::Malformed("a control line is not UTF-8".into()))?;
        let (op, rest) = line.split_once([' ', '\t']).unwrap_or((line, ""));
        let mut used = eol + 2;
        let parsed = match op.to_ascii_uppercase().as_str() {
            "PING" => ServerOp::Ping,
            "PONG" => ServerOp::Pong,
            "+OK" => ServerOp::Ok,
            "-ERR" => ServerOp::Err(rest.trim().trim_matches('\'').to_owned()),
            "INFO" => ServerOp::Info(rest.trim().to_owned()),
            kind @ ("MSG" | "HMSG") => {
                let (head, header_len, total) = msg_line(kind == "HMSG", rest)?;
                let end = used + total;
                if pending.len() < end + 2 {
                    return Ok(None);
                }
                if &pending[end..end + 2] != b"\r\n" {
                    return Err(NatsError::Malformed(format!(
                        "the {total}-byte payload of {kind} {rest} is not followed by CRLF"
                    )));
                }
                let msg = Msg {
                    headers: pending[used..used + header_len].to_vec(),
                    payload: pending[used + header_len..end].to_vec(),
                    ..head
                };
                used = end + 2;
                ServerOp::Msg(msg)
            }
            _ => {
                return Err(NatsError::Malformed(format!(
                    "unknown operation {:?}",
                    op.chars().take(32).collect::<String>()
                )));
            }
        };
        self.pos += used;
        Ok(Some(parsed))
    }
}

/// The arguments of `MSG <subject> <sid> [reply] <len>` or `HMSG <subject>
/// <sid> [reply] <header len> <total len>`: the message without its bytes,
/// the header length and the total length.
fn msg_line(headers: bool, args: &str) -> Result<(Msg, usize, usize), NatsError> {
    let bad = || NatsError::Malformed(format!("bad message line arguments {args:?}"));
    let a: Vec<&str> = args.split_ascii_whitespace().collect();
    let (subject, sid, reply, header_len, total) = match (headers, a.as_slice()) {
        (false, [s, sid, n]) => (s, sid, None, "0", n),
        (false, [s, sid, r, n]) => (s, sid, Some(r), "0", n),
        (true, [s, sid, h, n]) => (s, sid, None, *h, n),
        (true, [s, sid, r, h, n]) => (s, sid, Some(r), *h, n),
        _ => return Err(bad()),
    };
    let sid: u64 = sid.parse().map_err(|_| bad())?;
    let header_len: usize = header_len.parse().map_err(|_| bad())?;
    let total: usize = total.parse().map_err(|_| bad())?;
    if header_len > total || total > MAX_PAYLOAD {
        return Err(bad());
    }
    let msg = Msg {
        subject: (*subject).to_owned(),
        sid,
        reply: reply.map(|r| (*r).to_owned()),
        headers: Vec::new(),
        payload: Vec::new(),
    };
    Ok((msg, header_len, total))
}

/// One connection to a NATS server, subscribed to an inbox of its own for
/// the answers to its requests and publishes.
pub struct Client {
    conn: TcpStream,
    decoder: Decoder,
    read_buf: Vec<u8>,
    out: Vec<u8>,
    inbox: String,
    next_reply: u64,
    info: String,
}

impl Client {
    /// Connects, reads the server's INFO, and subscribes to the inbox; the
    /// subscription is in place when this returns (a PING has been
    /// answered after it).
    pub async fn connect(addr: SocketAddr) -> Result<Self, NatsError> {
        let conn = TcpStream::connect(addr).await?;
        conn.set_nodelay(true)?;
        let mut client = Client {
            conn,
            decoder: Decoder::new(),
            read_buf: vec![0; 64 * 1024],
            out: Vec::new(),
            inbox: format!("_INBOX.trellis-bench-{}", std::process::id()),
            next_reply: 0,
            info: String::new(),
        };
        client.info = match client.next_op().await? {
            ServerOp::Info(info) => info,
            other => {
                return Err(NatsError::Malformed(format!(
                    "expected INFO first, got {other:?}"
                )));
            }
        };
        client.out.extend_from_slice(
            br#"CONNECT {"verbose":false,"pedantic":false,"headers":true,"no_responders":true}"#,
        );
        client.out.extend_from_slice(b"\r\n");
        let sub = format!("SUB {}.* {INBOX_SID}\r\n", client.inbox);
        client.out.extend_from_slice(sub.as_bytes());
        client.ping().await?;
        Ok(client)
    }

    /// The JSON of the server's INFO.
    pub fn info(&self) -> &str {
        &self.info
    }

    /// The server's version from its INFO, e.g. "2.15.1".
    pub fn server_version(&self) -> Option<String> {
        let info: Value = serde_json::from_str(&self.info).ok()?;
        Some(info.get("version")?.as_str()?.to_owned())
    }

    /// A reply subject under the inbox that no earlier request used.
    pub fn new_reply(&mut self) -> String {
        self.next_reply += 1;
        format!("{}.{}", self.inbox, self.next_reply)
    }

    /// Queues a publish; nothing is sent until [`Client::flush`].
    pub fn publish(&mut self, subject: &str, reply: Option<&str>, payload: &[u8]) {
        let line = match reply {
            Some(r) => format!("PUB {subject} {r} {}\r\n", payload.len()),
            None => format!("PUB {subject} {}\r\n", payload.len()),
        };
        self.out.extend_from_slice(line.as_bytes());
        self.out.extend_from_slice(payload);
        self.out.extend_from_slice(b"\r\n");
    }

    /// Sends everything queued.
    pub async fn flush(&mut self) -> Result<(), NatsError> {
        if !self.out.is_empty() {
            self.conn.write_all(&self.out).await?;
            self.out.clear();
        }
        Ok(())
    }

    /// Sends what is queued and a PING, and waits for the PONG: the server
    /// has then processed everything sent before.
    pub async fn ping(&mut self) -> Result<(), NatsError> {
        self.out.extend_from_slice(b"PING\r\n");
        self.flush().await?;
        loop {
            match self.next_op().await? {
                ServerOp::Pong => return Ok(()),
                ServerOp::Err(e) => return Err(NatsError::Server(e)),
                ServerOp::Ping => self.pong().await?,
                ServerOp::Msg(_) | ServerOp::Info(_) | ServerOp::Ok => {}
            }
        }
    }

    /// The next message, reading from the connection if none is decoded
    /// yet. PINGs are answered on the way.
    pub async fn next_msg(&mut self) -> Result<Msg, NatsError> {
        loop {
            if let Some(m) = self.buffered_msg().await? {
                return Ok(m);
            }
            self.read_more().await?;
        }
    }

    /// The next message if one has already been read, without waiting for
    /// the connection.
    pub async fn buffered_msg(&mut self) -> Result<Option<Msg>, NatsError> {
        while let Some(op) = self.decoder.next_op()? {
            match op {
                ServerOp::Msg(m) => return Ok(Some(m)),
                ServerOp::Err(e) => return Err(NatsError::Server(e)),
                ServerOp::Ping => self.pong().await?,
                ServerOp::Pong | ServerOp::Info(_) | ServerOp::Ok => {}
            }
        }
        Ok(None)
    }

    /// Publishes `payload` to `subject` and waits for the answer on a new
    /// reply subject. Messages for earlier replies are skipped.
    pub async fn request(&mut self, subject: &str, payload: &[u8]) -> Result<Msg, NatsError> {
        let reply = self.new_reply();
        self.publish(subject, Some(&reply), payload);
        self.flush().await?;
        loop {
            let m = self.next_msg().await?;
            if m.subject == reply {
                return Ok(m);
            }
        }
    }

    async fn pong(&mut self) -> Result<(), NatsError> {
        self.out.extend_from_slice(b"PONG\r\n");
        self.flush().await
    }

    async fn next_op(&mut self) -> Result<ServerOp, NatsError> {
        loop {
            if let Some(op) = self.decoder.next_op()? {
                return Ok(op);
            }
            self.read_more().await?;
        }
    }

    async fn read_more(&mut self) -> Result<(), NatsError> {
        let n = self.conn.read(&mut self.read_buf).await?;
        if n == 0 {
            return Err(NatsError::Closed);
        }
        self.decoder.push(&self.read_buf[..n]);
        Ok(())
    }
}

/// The JSON of a JetStream answer (an API response or a publish ack), or
/// the error it carries: a status message (503: no stream takes the
/// subject), a body that is not JSON, or an `"error"` member.
pub fn check_answer(what: &str, msg: &Msg) -> Result<Value, NatsError> {
    let refused = |answer: String| NatsError::JetStream {
        what: what.to_owned(),
        answer,
    };
    if let Some(status) = msg.status() {
        return Err(refused(format!("status {status}")));
    }
    let v: Value = serde_json::from_slice(&msg.payload).map_err(|e| {
        refused(format!(
            "not JSON ({e}): {}",
            String::from_utf8_lossy(&msg.payload)
        ))
    })?;
    if let Some(error) = v.get("error") {
        return Err(refused(error.to_string()));
    }
    Ok(v)
}

/// Creates a file-backed stream taking `subjects`.
pub async fn create_stream(
    client: &mut Client,
    name: &str,
    subjects: &[&str],
) -> Result<(), NatsError> {
    let config = json!({
        "name": name,
        "subjects": subjects,
        "storage": "file",
        "retention": "limits",
        "discard": "old",
    });
    let answer = client
        .request(
            &format!("$JS.API.STREAM.CREATE.{name}"),
            config.to_string().as_bytes(),
        )
        .await?;
    check_answer("stream create", &answer).map(drop)
}

/// Deletes a stream and its files.
pub async fn delete_stream(client: &mut Client, name: &str) -> Result<(), NatsError> {
    let answer = client
        .request(&format!("$JS.API.STREAM.DELETE.{name}"), b"")
        .await?;
    check_answer("stream delete", &answer).map(drop)
}

/// Creates an ephemeral pull consumer that delivers the whole stream, with
/// no acknowledgements, and returns its name.
pub async fn create_pull_consumer(client: &mut Client, stream: &str) -> Result<String, NatsError> {
    let config = json!({
        "stream_name": stream,
        "config": { "ack_policy": "none", "deliver_policy": "all" },
    });
    let answer = client
        .request(
            &format!("$JS.API.CONSUMER.CREATE.{stream}"),
            config.to_string().as_bytes(),
        )
        .await?;
    let v = check_answer("consumer create", &answer)?;
    v.get("name")
        .and_then(Value::as_str)
        .map(str::to_owned)
        .ok_or_else(|| NatsError::JetStream {
            what: "consumer create".into(),
            answer: format!("no consumer name in {v}"),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all_ops(d: &mut Decoder) -> Vec<ServerOp> {
        let mut ops = Vec::new();
        while let Some(op) = d.next_op().unwrap() {
            ops.push(op);
        }
        ops
    }

    #[test]
    fn every_server_operation_is_decoded() {
        let mut d = Decoder::new();
        d.push(
            b"INFO {\"version\":\"2.15.1\"}\r\n+OK\r\nPING\r\npong\r\n-ERR 'Unknown Protocol Operation'\r\n\
              MSG a.b 1 5\r\nhello\r\nMSG a.b 7 _INBOX.x.3 2\r\nhi\r\n\
              HMSG _INBOX.x.4 1 28 28\r\nNATS/1.0 404 No Messages\r\n\r\n\r\n",
        );
        let ops = all_ops(&mut d);
        assert_eq!(
            ops,
            vec![
                ServerOp::Info("{\"version\":\"2.15.1\"}".into()),
                ServerOp::Ok,
                ServerOp::Ping,
                ServerOp::Pong,
                ServerOp::Err("Unknown Protocol Operation".into()),
                ServerOp::Msg(Msg {
                    subject: "a.b".into(),
                    sid: 1,
                    reply: None,
                    headers: vec![],
                    payload: b"hello".to_vec(),
                }),
                ServerOp::Msg(Msg {
                    subject: "a.b".into(),
                    sid: 7,
                    reply: Some("_INBOX.x.3".into()),
                    headers: vec![],
                    payload: b"hi".to_vec(),
                }),
                ServerOp::Msg(Msg {
                    subject: "_INBOX.x.4".into(),
                    sid: 1,
                    reply: None,
                    headers: b"NATS/1.0 404 No Messages\r\n\r\n".to_vec(),
                    payload: vec![],
                }),
            ]
        );
        let ServerOp::Msg(status) = &ops[7] else {
            unreachable!()
        };
        assert_eq!(status.status(), Some(404));
        let ServerOp::Msg(plain) = &ops[5] else {
            unreachable!()
        };
        assert_eq!(plain.status(), None);
    }

    #[test]
    fn a_message_with_headers_and_a_payload_keeps_them_apart() {
        let mut d = Decoder::new();
        d.push(b"HMSG s 1 r 23 32\r\nNATS/1.0\r\nNats-A: b\r\n\r\n{\"seq\":1}\r\n");
        let Some(ServerOp::Msg(m)) = d.next_op().unwrap() else {
            panic!("an HMSG")
        };
        assert_eq!(m.headers, b"NATS/1.0\r\nNats-A: b\r\n\r\n");
        assert_eq!(m.payload, b"{\"seq\":1}");
        assert_eq!(m.reply.as_deref(), Some("r"));
        assert_eq!(m.status(), None);
        assert_eq!(d.next_op().unwrap(), None);
    }

    #[test]
    fn a_frame_split_at_every_byte_is_decoded_once_it_is_whole() {
        let wire: &[u8] =
            b"MSG _INBOX.x.1 1 $JS.ACK.s.c.1.1.1.1.0 11\r\n{\"seq\":42}\n\r\nPING\r\n";
        for cut in 1..wire.len() {
            let mut d = Decoder::new();
            d.push(&wire[..cut]);
            let mut ops = all_ops(&mut d);
            d.push(&wire[cut..]);
            ops.extend(all_ops(&mut d));
            assert_eq!(ops.len(), 2, "split at byte {cut}");
            let ServerOp::Msg(m) = &ops[0] else {
                panic!("a MSG first when split at byte {cut}, got {:?}", ops[0])
            };
            assert_eq!(m.payload, b"{\"seq\":42}\n", "split at byte {cut}");
            assert_eq!(m.reply.as_deref(), Some("$JS.ACK.s.c.1.1.1.1.0"));
            assert_eq!(ops[1], ServerOp::Ping, "split at byte {cut}");
        }
    }

    #[test]
    fn a_payload_not_followed_by_crlf_is_malformed() {
        let mut d = Decoder::new();
        d.push(b"MSG a 1 2\r\nhiXX");
        assert!(matches!(d.next_op(), Err(NatsError::Malformed(_))));
    }

    #[test]
    fn bad_message_lines_and_unknown_operations_are_malformed_not_panics() {
        for wire in [
            &b"MSG a 1\r\n"[..],
            b"MSG a x 3\r\nabc\r\n",
            b"HMSG a 1 9 3\r\nabc\r\n",
            b"MSG a 1 99999999999\r\n",
            b"HELLO\r\n",
            b"\xff\xfe\r\n",
        ] {
            let mut d = Decoder::new();
            d.push(wire);
            assert!(
                matches!(d.next_op(), Err(NatsError::Malformed(_))),
                "{:?}",
                String::from_utf8_lossy(wire)
            );
        }
    }

    #[test]
    fn an_endless_control_line_is_refused_instead_of_buffered() {
        let mut d = Decoder::new();
        d.push(&vec![b'I'; MAX_CONTROL_LINE]);
        assert_eq!(d.next_op().unwrap(), None);
        d.push(b"II");
        assert!(matches!(d.next_op(), Err(NatsError::Malformed(_))));
    }

    #[test]
    fn an_answer_with_an_error_or_a_status_is_refused() {
        let msg = |headers: &[u8], payload: &[u8]| Msg {
            subject: "_INBOX.x.1".into(),
            sid: 1,
            reply: None,
            headers: headers.to_vec(),
            payload: payload.to_vec(),
        };
        let ack = check_answer("publish", &msg(b"", br#"{"stream":"B","seq":7}"#)).unwrap();
        assert_eq!(ack["seq"], 7);
        let err = check_answer(
            "publish",
            &msg(
                b"",
                br#"{"error":{"code":503,"description":"insufficient resources"}}"#,
            ),
        )
        .unwrap_err();
        assert!(err.to_string().contains("insufficient resources"), "{err}");
        let err = check_answer("publish", &msg(b"NATS/1.0 503\r\n\r\n", b"")).unwrap_err();
        assert_eq!(err.to_string(), "JetStream refused publish: status 503");
        assert!(check_answer("publish", &msg(b"", b"+OK")).is_err());
    }
}

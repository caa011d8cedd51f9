//! The WebSocket side of a stream: the upgrade answer and the relay between the user's
//! WebSocket and the agent's TLS stream.
//!
//! Framing follows Kubernetes' exec and attach streams when the client asks for
//! `v4.channel.k8s.io` or `v5.channel.k8s.io` (as kube-rs and kubectl do): each binary
//! message starts with a channel byte, 0 for what the user types, 1 for what the guest
//! writes; resize messages (channel 4) are ignored. A client that asks for neither gets
//! the bytes as they are (one binary message each way), which is what a VNC client over
//! a WebSocket (noVNC) expects.

use futures::{SinkExt, StreamExt};
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::Role;

/// The agent's stream, its answer line read (the buffer may hold the guest's first bytes).
pub type AgentStream = tokio::io::BufReader<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>;

const CHANNEL_PROTOCOLS: [&str; 2] = ["v4.channel.k8s.io", "v5.channel.k8s.io"];

/// Pure: the subprotocol to answer with among those offered (comma-separated, in any
/// number of headers), or None for raw bytes.
pub fn choose_protocol<'a>(offered: impl Iterator<Item = &'a str>) -> Option<&'static str> {
    let offered: Vec<&str> = offered.flat_map(|h| h.split(',')).map(str::trim).collect();
    CHANNEL_PROTOCOLS.into_iter().find(|p| offered.contains(p))
}

pub fn is_websocket(req: &Request<Incoming>) -> bool {
    let h = req.headers();
    h.get(http::header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"))
        && h.contains_key(http::header::SEC_WEBSOCKET_KEY)
}

/// Answers 101 and relays once the connection is handed over.
pub fn upgrade(mut req: Request<Incoming>, agent: AgentStream) -> Response<Full<Bytes>> {
    let key = req
        .headers()
        .get(http::header::SEC_WEBSOCKET_KEY)
        .map(|k| k.as_bytes().to_vec())
        .unwrap_or_default();
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(&key);
    let protocol = choose_protocol(
        req.headers()
            .get_all(http::header::SEC_WEBSOCKET_PROTOCOL)
            .iter()
            .filter_map(|v| v.to_str().ok()),
    );
    let pending = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        match pending.await {
            Ok(upgraded) => {
                let ws =
                    WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None)
                        .await;
                relay(ws, agent, protocol.is_some()).await;
            }
            Err(e) => tracing::info!(error = %e, "stream upgrade failed"),
        }
    });
    let mut resp = Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(http::header::UPGRADE, "websocket")
        .header(http::header::CONNECTION, "Upgrade")
        .header(http::header::SEC_WEBSOCKET_ACCEPT, accept);
    if let Some(p) = protocol {
        resp = resp.header(http::header::SEC_WEBSOCKET_PROTOCOL, p);
    }
    resp.body(Full::new(Bytes::new()))
        .expect("static response parts")
}

/// Pure: the bytes for the guest in a message from the user, if any.
pub fn from_user(msg: &[u8], channels: bool) -> Option<&[u8]> {
    match (channels, msg.split_first()) {
        (false, _) => Some(msg),
        (true, Some((0, rest))) => Some(rest),
        _ => None,
    }
}

/// Pure: the message carrying bytes from the guest.
pub fn to_user(data: &[u8], channels: bool) -> Bytes {
    if channels {
        let mut m = Vec::with_capacity(data.len() + 1);
        m.push(1);
        m.extend_from_slice(data);
        Bytes::from(m)
    } else {
        Bytes::copy_from_slice(data)
    }
}

async fn relay<S>(ws: WebSocketStream<S>, agent: AgentStream, channels: bool)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let (mut sink, mut stream) = ws.split();
    let (mut ar, mut aw) = tokio::io::split(agent);
    let up = async move {
        while let Some(Ok(msg)) = stream.next().await {
            match msg {
                Message::Binary(b) => {
                    if let Some(data) = from_user(&b, channels)
                        && (aw.write_all(data).await.is_err() || aw.flush().await.is_err())
                    {
                        return;
                    }
                }
                Message::Close(_) => return,
                _ => {}
            }
        }
    };
    let down = async move {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            match ar.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if sink
                        .send(Message::Binary(to_user(&buf[..n], channels)))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            }
        }
        let _ = sink.close().await;
    };
    tokio::select! {
        _ = up => {},
        _ = down => {},
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn framing_follows_the_protocol_the_client_asked_for() {
        let offered = ["v5.channel.k8s.io, v4.channel.k8s.io"];
        assert_eq!(
            choose_protocol(offered.into_iter()),
            Some("v4.channel.k8s.io")
        );
        assert_eq!(
            choose_protocol(["v5.channel.k8s.io"].into_iter()),
            Some("v5.channel.k8s.io")
        );
        assert_eq!(choose_protocol(["binary"].into_iter()), None);
        assert_eq!(from_user(&[0, b'l', b's'], true), Some(&b"ls"[..]));
        assert_eq!(from_user(&[4, b'{'], true), None, "resize is not typed");
        assert_eq!(from_user(b"RFB", false), Some(&b"RFB"[..]));
        assert_eq!(&to_user(b"hi", true)[..], &[1, b'h', b'i']);
        assert_eq!(&to_user(b"hi", false)[..], b"hi");
    }
}

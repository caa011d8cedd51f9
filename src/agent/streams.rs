//! The agent's end of a VM's console and VNC streams. Only the vmlet API component
//! reaches it: a TLS listener that requires a client certificate from the console CA
//! with the API component's name (an agent's own certificate is a server certificate and
//! cannot pass). The component sends one JSON line naming the VM and what to open; the
//! agent opens it through libvirt if that VM (same uid) is bound here, answers one JSON
//! line, then relays bytes both ways. No user credential ever reaches this side.

use std::sync::Arc;

use kube::runtime::reflector::ObjectRef;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_rustls::TlsAcceptor;

use super::Context;
use super::libvirt::GuestStream;
use crate::api::streams::{MAX_HANDSHAKE, StreamKind, StreamReply, StreamRequest};

/// The common name the API component's client certificate carries.
pub const API_CLIENT_NAME: &str = "vmlet-api";

/// Accepts stream connections until the listener fails.
pub async fn serve(
    listener: tokio::net::TcpListener,
    tls: Arc<rustls::ServerConfig>,
    ctx: Arc<Context>,
) {
    let acceptor = TlsAcceptor::from(tls);
    loop {
        let Ok((tcp, peer)) = listener.accept().await else {
            continue;
        };
        let (acceptor, ctx) = (acceptor.clone(), ctx.clone());
        tokio::spawn(async move {
            if let Err(e) = handle(tcp, acceptor, &ctx).await {
                tracing::info!(%peer, error = %e, "stream refused or ended");
            }
        });
    }
}

/// Reads one line of at most `MAX_HANDSHAKE` bytes.
async fn read_line<R: AsyncRead + Unpin>(
    r: &mut tokio::io::BufReader<R>,
) -> Result<String, String> {
    let mut line = Vec::new();
    let n = (&mut *r)
        .take(MAX_HANDSHAKE as u64)
        .read_until(b'\n', &mut line)
        .await
        .map_err(|e| e.to_string())?;
    if n == 0 || line.last() != Some(&b'\n') {
        return Err("no handshake line".into());
    }
    String::from_utf8(line).map_err(|e| e.to_string())
}

async fn handle(
    tcp: tokio::net::TcpStream,
    acceptor: TlsAcceptor,
    ctx: &Context,
) -> Result<(), String> {
    let tls = acceptor.accept(tcp).await.map_err(|e| e.to_string())?;
    let name = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .and_then(crate::tls::common_name);
    if name.as_deref() != Some(API_CLIENT_NAME) {
        return Err(format!(
            "client certificate names {name:?}, not {API_CLIENT_NAME}"
        ));
    }
    let mut conn = tokio::io::BufReader::new(tls);
    let req: StreamRequest =
        serde_json::from_str(read_line(&mut conn).await?.trim_end()).map_err(|e| e.to_string())?;
    let opened = open(ctx, &req).await;
    let reply = StreamReply {
        error: opened.as_ref().err().cloned(),
    };
    let mut line = serde_json::to_vec(&reply).expect("serialisable");
    line.push(b'\n');
    conn.write_all(&line).await.map_err(|e| e.to_string())?;
    conn.flush().await.map_err(|e| e.to_string())?;
    tracing::info!(vm = %req.name, namespace = %req.namespace, kind = ?req.kind, ok = opened.is_ok(), "stream opened");
    match opened? {
        Opened::Console(g) => relay_channels(conn, g).await,
        Opened::Vnc(fd) => {
            let std = std::os::unix::net::UnixStream::from(fd);
            std.set_nonblocking(true).map_err(|e| e.to_string())?;
            let mut vnc = tokio::net::UnixStream::from_std(std).map_err(|e| e.to_string())?;
            tokio::io::copy_bidirectional(&mut conn, &mut vnc)
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        }
    }
}

enum Opened {
    Console(GuestStream),
    Vnc(std::os::fd::OwnedFd),
}

/// Opens what `req` asks for if its VM is bound here and is the one named.
async fn open(ctx: &Context, req: &StreamRequest) -> Result<Opened, String> {
    let vm = ctx
        .vms
        .get(&ObjectRef::new(&req.name).within(&req.namespace))
        .filter(|vm| vm.metadata.uid.as_deref() == Some(req.uid.as_str()))
        .ok_or_else(|| {
            format!(
                "VM {}/{} is not on node {}",
                req.namespace, req.name, ctx.node
            )
        })?;
    if req.kind == StreamKind::Vnc && vm.spec.graphics != Some(true) {
        return Err(format!("VM {} has no display: set spec.graphics", req.name));
    }
    let running = ctx
        .lv
        .lookup(&req.uid)
        .await
        .map_err(|e| e.to_string())?
        .is_some_and(|d| d.state.active());
    if !running {
        return Err(format!("VM {} is not running", req.name));
    }
    match req.kind {
        StreamKind::Console => ctx.lv.open_console(&req.uid).await.map(Opened::Console),
        StreamKind::Vnc => ctx.lv.open_vnc(&req.uid).await.map(Opened::Vnc),
    }
    .map_err(|e| e.to_string())
}

/// Relays between the connection and the console's channels until either side ends.
async fn relay_channels<S>(conn: S, g: GuestStream) -> Result<(), String>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let GuestStream { mut output, input } = g;
    let (mut r, mut w) = tokio::io::split(conn);
    let to_guest = async move {
        let mut buf = vec![0u8; 4096];
        loop {
            let n = r.read(&mut buf).await.map_err(|e| e.to_string())?;
            if n == 0 || input.send(buf[..n].to_vec()).await.is_err() {
                return Ok::<(), String>(());
            }
        }
    };
    let from_guest = async move {
        while let Some(b) = output.recv().await {
            w.write_all(&b).await.map_err(|e| e.to_string())?;
            w.flush().await.map_err(|e| e.to_string())?;
        }
        Ok::<(), String>(())
    };
    tokio::select! {
        r = to_guest => r,
        r = from_guest => r,
    }
}

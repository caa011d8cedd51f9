//! `kubectl vm console` and `kubectl vm vnc`: a WebSocket to the VM's
//! `subresources.vmlet.dev` subresource through the Kubernetes API server, opened by
//! kube-rs with whatever login the kubeconfig has (client certificate, token, exec
//! plugin). Framing is Kubernetes' channel protocol: channel 0 carries what the user
//! types, channel 1 what the guest writes.

use std::io::{IsTerminal, Read, Write};
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

use crate::api::streams::{GROUP, StreamKind, VERSION};

/// Ctrl+], as virsh console and telnet use.
pub const ESCAPE: u8 = 0x1d;

type Ws = tokio_tungstenite::WebSocketStream<hyper_util::rt::TokioIo<hyper::upgrade::Upgraded>>;

/// Opens the VM's console or display.
pub async fn open(
    client: &kube::Client,
    ns: &str,
    name: &str,
    kind: StreamKind,
) -> anyhow::Result<Ws> {
    let path = format!(
        "/apis/{GROUP}/{VERSION}/namespaces/{ns}/virtualmachines/{name}/{}",
        kind.subresource()
    );
    let req = http::Request::get(path).body(vec![])?;
    let conn = client.connect(req).await.map_err(|e| match e {
        kube::Error::Api(s) => anyhow::anyhow!("{}", s.message),
        other => anyhow::anyhow!(other),
    })?;
    Ok(conn.into_stream())
}

/// Pure: what to send for bytes typed at a terminal: those before an escape byte, and
/// whether the user asked to leave.
pub fn typed(data: &[u8], tty: bool) -> (&[u8], bool) {
    match data.iter().position(|b| tty && *b == ESCAPE) {
        Some(i) => (&data[..i], true),
        None => (data, false),
    }
}

/// Puts the terminal in raw mode until dropped.
struct RawTerminal(libc::termios);

impl RawTerminal {
    fn enter() -> Option<Self> {
        // SAFETY: termios is plain data; fd 0 is this process's stdin.
        unsafe {
            let mut t: libc::termios = std::mem::zeroed();
            if libc::tcgetattr(0, &mut t) != 0 {
                return None;
            }
            let saved = t;
            libc::cfmakeraw(&mut t);
            (libc::tcsetattr(0, libc::TCSANOW, &t) == 0).then_some(RawTerminal(saved))
        }
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        // SAFETY: restores the settings read from the same fd.
        unsafe {
            libc::tcsetattr(0, libc::TCSANOW, &self.0);
        }
    }
}

/// Interactive on a terminal (raw mode, Ctrl+] leaves). Otherwise scriptable: stdin is
/// typed into the console, and the console is read until it has been quiet for `idle`
/// after stdin ends.
pub async fn console(
    client: &kube::Client,
    ns: &str,
    name: &str,
    idle: Duration,
) -> anyhow::Result<()> {
    let ws = open(client, ns, name, StreamKind::Console).await?;
    let tty = std::io::stdin().is_terminal();
    if tty {
        eprint!("Connected to {ns}/{name}'s serial console. Escape character is ^] (Ctrl+]).\r\n");
    }
    let raw = if tty { RawTerminal::enter() } else { None };
    let (mut sink, mut stream) = ws.split();
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Option<Vec<u8>>>(16);
    // stdin blocks: a thread of its own, which ends with the process.
    std::thread::spawn(move || {
        let mut buf = [0u8; 1024];
        let mut stdin = std::io::stdin().lock();
        loop {
            match stdin.read(&mut buf) {
                Ok(0) | Err(_) => {
                    let _ = tx.blocking_send(None);
                    return;
                }
                Ok(n) => {
                    let (send, leave) = typed(&buf[..n], tty);
                    if tx.blocking_send(Some(send.to_vec())).is_err() || leave {
                        let _ = tx.blocking_send(None);
                        return;
                    }
                }
            }
        }
    });
    let mut stdout = std::io::stdout();
    let mut input_done = false;
    loop {
        let quiet = tokio::time::sleep(idle);
        tokio::select! {
            typed = rx.recv(), if !input_done => match typed.flatten() {
                Some(data) if !data.is_empty() => {
                    let mut m = vec![0u8];
                    m.extend_from_slice(&data);
                    sink.send(Message::Binary(m.into())).await?;
                }
                Some(_) => {}
                // Ctrl+] at a terminal leaves; a script's end of input waits for quiet.
                None if tty => break,
                None => input_done = true,
            },
            msg = stream.next() => match msg {
                Some(Ok(Message::Binary(b))) => {
                    if let Some((1, data)) = b.split_first() {
                        stdout.write_all(data)?;
                        stdout.flush()?;
                    }
                }
                Some(Ok(Message::Close(_))) | None => break,
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    drop(raw);
                    anyhow::bail!("console stream: {e}");
                }
            },
            _ = quiet, if input_done => break,
        }
    }
    let _ = sink.close().await;
    drop(raw);
    if tty {
        eprint!("\r\nDisconnected from {ns}/{name}.\r\n");
    }
    Ok(())
}

/// Viewers launched when found on PATH, with how each takes `host:port`.
const VIEWERS: [(&str, &str); 3] = [
    ("remote-viewer", "vnc://{addr}"),
    ("vncviewer", "{host}::{port}"),
    ("gvncviewer", "{host}::{port}"),
];

fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(program).is_file()))
}

/// Forwards a local port to the VM's display: each connection to it is a new stream.
pub async fn vnc(
    client: &kube::Client,
    ns: &str,
    name: &str,
    port: u16,
    launch: bool,
) -> anyhow::Result<()> {
    // Fails early, before a port is offered, when the user may not or the VM has none.
    let first = open(client, ns, name, StreamKind::Vnc).await?;
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
    let addr = listener.local_addr()?;
    println!("VNC display of {ns}/{name} at {addr} (vnc://{addr}); Ctrl+C to stop");
    std::io::stdout().flush()?;
    let viewer = VIEWERS.iter().find(|(v, _)| launch && on_path(v));
    if let Some((viewer, arg)) = viewer {
        let arg = arg
            .replace("{addr}", &addr.to_string())
            .replace("{host}", &addr.ip().to_string())
            .replace("{port}", &addr.port().to_string());
        eprintln!("launching {viewer} {arg}");
        let _ = tokio::process::Command::new(viewer).arg(arg).spawn();
    }
    let mut first = Some(first);
    loop {
        let (tcp, _) = listener.accept().await?;
        let ws = match first.take() {
            Some(ws) => ws,
            None => match open(client, ns, name, StreamKind::Vnc).await {
                Ok(ws) => ws,
                Err(e) => {
                    eprintln!("{e}");
                    continue;
                }
            },
        };
        tokio::spawn(forward(tcp, ws));
    }
}

/// Relays one local connection and one stream, channel-framed.
async fn forward(tcp: tokio::net::TcpStream, ws: Ws) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut r, mut w) = tcp.into_split();
    let (mut sink, mut stream) = ws.split();
    let up = async move {
        let mut buf = vec![0u8; 16 * 1024];
        while let Ok(n) = r.read(&mut buf).await {
            if n == 0 {
                break;
            }
            let mut m = vec![0u8];
            m.extend_from_slice(&buf[..n]);
            if sink.send(Message::Binary(m.into())).await.is_err() {
                break;
            }
        }
        let _ = sink.close().await;
    };
    let down = async move {
        while let Some(Ok(msg)) = stream.next().await {
            let Message::Binary(b) = msg else { continue };
            if let Some((1, data)) = b.split_first()
                && w.write_all(data).await.is_err()
            {
                break;
            }
        }
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
    fn the_escape_byte_ends_typing_only_at_a_terminal() {
        assert_eq!(typed(b"ls\r", true), (&b"ls\r"[..], false));
        assert_eq!(typed(b"ab\x1dcd", true), (&b"ab"[..], true));
        assert_eq!(typed(b"ab\x1dcd", false), (&b"ab\x1dcd"[..], false));
    }
}

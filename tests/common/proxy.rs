//! A TCP proxy to the API server that a test cuts, to cut an agent off.
#![allow(dead_code)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// A TCP proxy to the API server that can be cut (open connections dropped, new ones
/// refused) and healed.
pub struct Proxy {
    pub port: u16,
    cut: Arc<AtomicBool>,
    conns: Arc<std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>>,
}

impl Proxy {
    pub async fn start(target: String) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let cut = Arc::new(AtomicBool::new(false));
        let conns: Arc<std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>> = Arc::default();
        let (c, k) = (cut.clone(), conns.clone());
        tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    continue;
                };
                if c.load(Ordering::SeqCst) {
                    continue; // dropped: connection refused in effect
                }
                let target = target.clone();
                let h = tokio::spawn(async move {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(&target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                k.lock().unwrap().push(h);
            }
        });
        Proxy { port, cut, conns }
    }

    pub fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        for h in self.conns.lock().unwrap().drain(..) {
            h.abort();
        }
    }

    pub fn heal(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }
}

/// The admin kubeconfig's text and its server URL.
pub fn admin_kubeconfig() -> (String, String) {
    let text = std::fs::read_to_string(super::kubeconfig_path()).unwrap();
    let server = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("server: "))
        .unwrap()
        .to_string();
    (text, server)
}

/// A kubeconfig like the admin one, but through the proxy.
pub fn proxied_kubeconfig(dir: &std::path::Path, port: u16) -> std::path::PathBuf {
    let (text, server) = admin_kubeconfig();
    let path = dir.join("agent-a.kubeconfig");
    std::fs::write(
        &path,
        text.replace(&server, &format!("https://127.0.0.1:{port}")),
    )
    .unwrap();
    path
}

pub fn fast(a: &mut vmlet::agent::Args) {
    a.lease_duration_seconds = 4;
    a.heartbeat_seconds = 1;
    a.fence_after_seconds = 4;
}

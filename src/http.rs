//! A tiny HTTP/1 server for /metrics and /healthz, shared by controller and agent.

use std::convert::Infallible;
use std::future::Future;

use http_body_util::Full;
pub use hyper::body::Bytes;
use hyper::{Response, StatusCode};
use hyper_util::rt::TokioIo;

/// Serves GET requests: `handler(path)` gives (content type, body bytes), or None for 404.
pub async fn serve<F, Fut>(listener: tokio::net::TcpListener, handler: F)
where
    F: Fn(String) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Option<(&'static str, Bytes)>> + Send + 'static,
{
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let handler = handler.clone();
        tokio::spawn(async move {
            let svc =
                hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let handler = handler.clone();
                    async move {
                        let resp = match handler(req.uri().path().to_string()).await {
                            Some((ct, body)) => Response::builder()
                                .header("content-type", ct)
                                .body(Full::new(body)),
                            None => Response::builder()
                                .status(StatusCode::NOT_FOUND)
                                .body(Full::new(Bytes::from("not found\n"))),
                        };
                        Ok::<_, Infallible>(resp.expect("static response parts"))
                    }
                });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

//! A small HTTP/1 server (hyper) for /metrics, /healthz and the agent's console stream,
//! shared by controller and agent.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;

use futures::{Stream, StreamExt};
use http_body_util::{BodyExt, Full, StreamBody, combinators::UnsyncBoxBody};
use hyper::Response;
pub use hyper::body::Bytes;
use hyper::body::Frame;
use hyper_util::rt::TokioIo;

/// What a handler sees of a request.
#[derive(Debug, Clone)]
pub struct Request {
    pub path: String,
    pub query: Option<String>,
    /// The token of an `Authorization: Bearer` header.
    pub bearer: Option<String>,
}

impl Request {
    /// Whether the query string holds `key=1` or `key=true`.
    pub fn flag(&self, key: &str) -> bool {
        self.query
            .as_deref()
            .unwrap_or_default()
            .split('&')
            .any(|kv| kv == format!("{key}=1") || kv == format!("{key}=true"))
    }
}

pub enum Body {
    Full(Bytes),
    Stream(Pin<Box<dyn Stream<Item = Bytes> + Send>>),
}

pub struct Reply {
    pub status: u16,
    pub content_type: &'static str,
    pub body: Body,
}

impl Reply {
    pub fn ok(content_type: &'static str, body: impl Into<Bytes>) -> Self {
        Reply {
            status: 200,
            content_type,
            body: Body::Full(body.into()),
        }
    }

    pub fn error(status: u16, message: impl Into<String>) -> Self {
        Reply {
            status,
            content_type: "text/plain",
            body: Body::Full(format!("{}\n", message.into()).into()),
        }
    }
}

/// Serves every request with `handler`.
pub async fn serve_requests<F, Fut>(listener: tokio::net::TcpListener, handler: F)
where
    F: Fn(Request) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Reply> + Send + 'static,
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
                    let bearer = req
                        .headers()
                        .get(hyper::header::AUTHORIZATION)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.strip_prefix("Bearer "))
                        .map(str::to_string);
                    let r = Request {
                        path: req.uri().path().to_string(),
                        query: req.uri().query().map(String::from),
                        bearer,
                    };
                    async move {
                        let reply = handler(r).await;
                        let body: UnsyncBoxBody<Bytes, Infallible> = match reply.body {
                            Body::Full(b) => Full::new(b).boxed_unsync(),
                            Body::Stream(s) => BodyExt::boxed_unsync(StreamBody::new(
                                s.map(|b| Ok::<_, Infallible>(Frame::data(b))),
                            )),
                        };
                        let resp = Response::builder()
                            .status(reply.status)
                            .header("content-type", reply.content_type)
                            .body(body)
                            .expect("static response parts");
                        Ok::<_, Infallible>(resp)
                    }
                });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

/// Serves GET requests: `handler(path)` gives (content type, body bytes), or None for 404.
pub async fn serve<F, Fut>(listener: tokio::net::TcpListener, handler: F)
where
    F: Fn(String) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Option<(&'static str, Bytes)>> + Send + 'static,
{
    serve_requests(listener, move |req: Request| {
        let handler = handler.clone();
        async move {
            match handler(req.path).await {
                Some((ct, body)) => Reply::ok(ct, body),
                None => Reply::error(404, "not found"),
            }
        }
    })
    .await
}

//! A stand-in for ACS's token signer: RS256 tokens made with a test-only key
//! (`fixtures/acs-test-signer.key.pem`, kid `acs-test-key-1`), and a JWKS server on loopback
//! whose keys can be swapped or taken down, to test key refresh and caching.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use tokio_util::sync::CancellationToken;

/// The test key's id in its JWKS.
pub const TEST_KID: &str = "acs-test-key-1";
/// The issuer ACS uses.
pub const ACS_ISSUER: &str = "https://acscallautomation.communication.azure.com";
/// An ACS resource id for tests.
pub const TEST_AUDIENCE: &str = "11111111-2222-3333-4444-555555555555";

/// The test signer's private key (PEM).
pub fn signer_key_pem() -> &'static str {
    include_str!("../fixtures/acs-test-signer.key.pem")
}

/// The test signer's JWKS document.
pub fn jwks_json() -> &'static str {
    include_str!("../fixtures/acs-test-jwks.json")
}

/// Path of the JWKS fixture file.
pub fn jwks_file() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/acs-test-jwks.json"))
}

fn now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
}

/// Claims of an ACS-like token, valid now for an hour unless changed.
pub fn claims(audience: &str) -> serde_json::Value {
    serde_json::json!({ "iss": ACS_ISSUER, "aud": audience, "iat": now(), "nbf": now() - 5, "exp": now() + 3600 })
}

/// Signs `claims` with the test key under `kid`.
pub fn sign(claims: &serde_json::Value, kid: &str) -> anyhow::Result<String> {
    let mut header = Header::new(Algorithm::RS256);
    header.kid = Some(kid.to_owned());
    Ok(encode(&header, claims, &EncodingKey::from_rsa_pem(signer_key_pem().as_bytes())?)?)
}

/// A valid token for `audience`.
pub fn valid_token(audience: &str) -> anyhow::Result<String> {
    sign(&claims(audience), TEST_KID)
}

/// Seconds since the epoch, for building claims.
pub fn unix_now() -> i64 {
    now()
}

/// A JWKS endpoint on loopback whose document can be replaced, or which can answer 503.
#[derive(Debug)]
pub struct JwksServer {
    addr: SocketAddr,
    document: Arc<Mutex<Option<String>>>,
    fetches: Arc<std::sync::atomic::AtomicU64>,
    shutdown: CancellationToken,
}

impl Drop for JwksServer {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

impl JwksServer {
    /// Serves `document` (None: answer 503) on a port from the OS.
    pub async fn start(document: Option<String>) -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let document = Arc::new(Mutex::new(document));
        let fetches = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let shutdown = CancellationToken::new();
        let (doc, count, stop) = (document.clone(), fetches.clone(), shutdown.clone());
        tokio::spawn(async move {
            loop {
                let (stream, _) = tokio::select! {
                    () = stop.cancelled() => break,
                    accepted = listener.accept() => match accepted { Ok(pair) => pair, Err(_) => continue },
                };
                let (doc, count) = (doc.clone(), count.clone());
                tokio::spawn(async move {
                    let service = service_fn(move |_req| {
                        count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        let current = doc.lock().ok().and_then(|d| d.clone());
                        async move {
                            let mut response =
                                Response::new(Full::new(Bytes::from(current.clone().unwrap_or_default())));
                            if current.is_none() {
                                *response.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
                            }
                            Ok::<_, Infallible>(response)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Ok(Self { addr, document, fetches, shutdown })
    }

    /// The JWKS URL.
    pub fn url(&self) -> String {
        format!("http://{}/calling/keys", self.addr)
    }

    /// Replaces the document (None: the endpoint answers 503, as if down).
    pub fn set(&self, document: Option<String>) {
        if let Ok(mut d) = self.document.lock() {
            *d = document;
        }
    }

    /// How many times the document was requested.
    pub fn fetches(&self) -> u64 {
        self.fetches.load(std::sync::atomic::Ordering::SeqCst)
    }
}

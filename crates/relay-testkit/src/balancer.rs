//! A layer-4 load balancer for tests: one loopback address, UDP and TCP on the same port, in
//! front of several backends. Each new flow (client address and port) goes to the backend a
//! hash of the flow picks and stays there, as an Azure load balancer or a Container Apps TCP
//! ingress does; a new connection from a new source port may land anywhere. Nothing in it knows
//! about acs-relay, so an agent behind it sees only one edge address.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::net::{TcpListener, UdpSocket};
use tokio_util::sync::CancellationToken;

/// Largest datagram forwarded.
const MAX_DATAGRAM: usize = 65_536;

/// Flows tracked at most; past this, new UDP flows are dropped (a test makes a few dozen).
const MAX_FLOWS: usize = 4096;

/// How many times to look for a port number free on both UDP and TCP.
const SAME_PORT_TRIES: usize = 16;

/// The backend index for a flow: FNV-1a over its address and port.
fn pick(flow: SocketAddr, backends: usize) -> usize {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in flow.to_string().bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    usize::try_from(hash % backends.max(1) as u64).unwrap_or(0)
}

/// The running balancer; stops when dropped.
#[derive(Debug)]
pub struct FlowBalancer {
    addr: SocketAddr,
    stop: CancellationToken,
    /// Flows seen per backend, UDP and TCP together.
    flows: Arc<Mutex<Vec<u64>>>,
}

impl Drop for FlowBalancer {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl FlowBalancer {
    /// Listens on one loopback port (UDP and TCP) and spreads flows over `backends`, each of
    /// which serves UDP and TCP on its address (an edge's tunnel listeners).
    pub async fn start(backends: Vec<SocketAddr>) -> anyhow::Result<Self> {
        anyhow::ensure!(!backends.is_empty(), "a balancer needs a backend");
        let (udp, tcp) = bind_same_port().await?;
        let addr = udp.local_addr()?;
        let stop = CancellationToken::new();
        let flows = Arc::new(Mutex::new(vec![0; backends.len()]));
        let backends = Arc::new(backends);
        tokio::spawn(serve_udp(Arc::new(udp), backends.clone(), flows.clone(), stop.clone()));
        tokio::spawn(serve_tcp(tcp, backends, flows.clone(), stop.clone()));
        Ok(Self { addr, stop, flows })
    }

    /// The one address agents dial.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Flows sent to each backend so far.
    pub fn flows(&self) -> Vec<u64> {
        self.flows.lock().map(|f| f.clone()).unwrap_or_default()
    }
}

async fn bind_same_port() -> anyhow::Result<(UdpSocket, TcpListener)> {
    let mut last = None;
    for _ in 0..SAME_PORT_TRIES {
        let udp = UdpSocket::bind("127.0.0.1:0").await?;
        match TcpListener::bind(udp.local_addr()?).await {
            Ok(tcp) => return Ok((udp, tcp)),
            Err(e) => last = Some(e),
        }
    }
    Err(last.map_or_else(|| anyhow::anyhow!("no port free on UDP and TCP"), Into::into))
}

fn count(flows: &Mutex<Vec<u64>>, backend: usize) {
    if let Ok(mut flows) = flows.lock()
        && let Some(n) = flows.get_mut(backend)
    {
        *n += 1;
    }
}

async fn serve_udp(
    front: Arc<UdpSocket>,
    backends: Arc<Vec<SocketAddr>>,
    flows: Arc<Mutex<Vec<u64>>>,
    stop: CancellationToken,
) {
    let mut upstreams: HashMap<SocketAddr, Arc<UdpSocket>> = HashMap::new();
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        let (len, client) = tokio::select! {
            () = stop.cancelled() => return,
            received = front.recv_from(&mut buf) => match received {
                Ok(received) => received,
                Err(_) => continue,
            },
        };
        let upstream = match upstreams.get(&client) {
            Some(upstream) => upstream.clone(),
            None if upstreams.len() >= MAX_FLOWS => continue,
            None => {
                let backend = pick(client, backends.len());
                let Some(target) = backends.get(backend).copied() else { continue };
                let Ok(socket) = UdpSocket::bind("127.0.0.1:0").await else { continue };
                if socket.connect(target).await.is_err() {
                    continue;
                }
                count(&flows, backend);
                let socket = Arc::new(socket);
                upstreams.insert(client, socket.clone());
                let (back, front, stop) = (socket.clone(), front.clone(), stop.clone());
                tokio::spawn(async move {
                    let mut buf = vec![0u8; MAX_DATAGRAM];
                    loop {
                        let len = tokio::select! {
                            () = stop.cancelled() => return,
                            received = back.recv(&mut buf) => match received {
                                Ok(len) => len,
                                Err(_) => continue,
                            },
                        };
                        let _ = front.send_to(buf.get(..len).unwrap_or_default(), client).await;
                    }
                });
                socket
            }
        };
        let _ = upstream.send(buf.get(..len).unwrap_or_default()).await;
    }
}

async fn serve_tcp(
    listener: TcpListener,
    backends: Arc<Vec<SocketAddr>>,
    flows: Arc<Mutex<Vec<u64>>>,
    stop: CancellationToken,
) {
    loop {
        let (mut client, peer) = tokio::select! {
            () = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(_) => continue,
            },
        };
        let backend = pick(peer, backends.len());
        let Some(target) = backends.get(backend).copied() else { continue };
        count(&flows, backend);
        let stop = stop.clone();
        tokio::spawn(async move {
            let Ok(mut upstream) = tokio::net::TcpStream::connect(target).await else { return };
            tokio::select! {
                () = stop.cancelled() => {}
                _ = tokio::io::copy_bidirectional(&mut client, &mut upstream) => {}
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flows_are_spread_over_every_backend_and_each_flow_sticks() {
        let mut seen = [0usize; 2];
        for port in 40_000..40_200 {
            let flow = SocketAddr::from(([127, 0, 0, 1], port));
            let backend = pick(flow, 2);
            assert_eq!(pick(flow, 2), backend, "a flow keeps its backend");
            seen[backend] += 1;
        }
        assert!(seen.iter().all(|n| *n > 60), "{seen:?}");
    }
}

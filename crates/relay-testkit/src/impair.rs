//! Link-impairment proxies for fault tests, placed between agent and edge, so runs are
//! reproducible and need no root (this kernel has no `netem`):
//!
//! * [`UdpImpairProxy`] drops, delays, jitters and reorders datagrams with a seeded random
//!   generator; each agent source address gets its own upstream socket, so several agents can
//!   share one proxy;
//! * [`TcpImpairProxy`] delays and jitters the byte stream of each connection (in order: TCP
//!   loses nothing, so loss on TCP is the kernel's business, e.g. an `iptables -m statistic`
//!   rule inside a test's namespace).
//!
//! Both can black-hole the link entirely, as a pulled cable or a firewall that drops silently
//! would: nothing passes and nobody is told.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;

/// Largest datagram forwarded; QUIC never sends more than about 1,500 bytes on loopback paths
/// it has not probed, and 64 KiB covers anything UDP can carry.
const MAX_DATAGRAM: usize = 65_536;

/// Upstream sockets the proxy keeps at most: one per agent source address.
const MAX_FLOWS: usize = 256;

/// How the link misbehaves, in each direction alike.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Impairment {
    /// Probability that a datagram is dropped (0.0 to 1.0).
    pub loss: f64,
    /// Fixed one-way delay added to every datagram.
    pub delay: Duration,
    /// Each datagram's delay varies uniformly by up to this much either way, which also
    /// reorders datagrams sent closer together than the jitter.
    pub jitter: Duration,
}

impl Impairment {
    /// A perfect link.
    pub const NONE: Self = Self { loss: 0.0, delay: Duration::ZERO, jitter: Duration::ZERO };
}

/// What passed through the proxy so far.
#[derive(Debug, Default)]
pub struct ImpairStats {
    /// Datagrams forwarded (after their delay).
    pub forwarded: AtomicU64,
    /// Datagrams dropped by the loss rate or the black hole.
    pub dropped: AtomicU64,
}

struct Shared {
    impairment: Mutex<Impairment>,
    blackhole: AtomicBool,
    rng: Mutex<fastrand::Rng>,
    stats: ImpairStats,
}

impl Shared {
    /// A link with `impairment`, not black-holed, drawing its decisions from `seed`.
    fn new(impairment: Impairment, seed: u64) -> Self {
        Self {
            impairment: Mutex::new(impairment),
            blackhole: AtomicBool::new(false),
            rng: Mutex::new(fastrand::Rng::with_seed(seed)),
            stats: ImpairStats::default(),
        }
    }

    /// Decides one datagram's fate: `None` to drop it, or the delay before it is sent.
    fn fate(&self) -> Option<Duration> {
        if self.blackhole.load(Ordering::SeqCst) {
            self.stats.dropped.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        let impairment = self.impairment.lock().map(|i| *i).unwrap_or(Impairment::NONE);
        let mut rng = self.rng.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if rng.f64() < impairment.loss {
            self.stats.dropped.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        let jitter = impairment.jitter.as_secs_f64() * (rng.f64() * 2.0 - 1.0);
        Some(Duration::from_secs_f64((impairment.delay.as_secs_f64() + jitter).max(0.0)))
    }
}

/// A running UDP impairment proxy; stops when dropped.
pub struct UdpImpairProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: CancellationToken,
}

impl std::fmt::Debug for UdpImpairProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UdpImpairProxy").field("addr", &self.addr).finish()
    }
}

impl Drop for UdpImpairProxy {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl UdpImpairProxy {
    /// Listens on `127.0.0.1` (a port from the OS) and forwards to `target` with `impairment`,
    /// drawing every random decision from `seed`.
    pub async fn start(target: SocketAddr, impairment: Impairment, seed: u64) -> std::io::Result<Self> {
        let socket = Arc::new(UdpSocket::bind("127.0.0.1:0").await?);
        let addr = socket.local_addr()?;
        let shared = Arc::new(Shared::new(impairment, seed));
        let stop = CancellationToken::new();
        tokio::spawn(run(socket, target, shared.clone(), stop.clone()));
        Ok(Self { addr, shared, stop })
    }

    /// The address agents dial instead of the edge.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Changes the impairment from now on.
    pub fn set(&self, impairment: Impairment) {
        if let Ok(mut current) = self.shared.impairment.lock() {
            *current = impairment;
        }
    }

    /// Drops every datagram both ways while `on`, silently.
    pub fn blackhole(&self, on: bool) {
        self.shared.blackhole.store(on, Ordering::SeqCst);
    }

    /// What passed so far.
    pub fn stats(&self) -> &ImpairStats {
        &self.shared.stats
    }
}

/// Sends `datagram` to `to` from `socket` after the impairment's delay, or drops it.
fn forward(shared: &Arc<Shared>, socket: &Arc<UdpSocket>, datagram: Vec<u8>, to: SocketAddr) {
    let Some(delay) = shared.fate() else { return };
    let (socket, shared) = (socket.clone(), shared.clone());
    tokio::spawn(async move {
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        if socket.send_to(&datagram, to).await.is_ok() {
            shared.stats.forwarded.fetch_add(1, Ordering::Relaxed);
        }
    });
}

async fn run(socket: Arc<UdpSocket>, target: SocketAddr, shared: Arc<Shared>, stop: CancellationToken) {
    let mut flows: HashMap<SocketAddr, Arc<UdpSocket>> = HashMap::new();
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        let (len, from) = tokio::select! {
            () = stop.cancelled() => return,
            received = socket.recv_from(&mut buf) => match received {
                Ok(pair) => pair,
                // ICMP errors from a closed port surface here; the link itself goes on.
                Err(_) => continue,
            },
        };
        let upstream = match flows.get(&from) {
            Some(upstream) => upstream.clone(),
            None if flows.len() < MAX_FLOWS => {
                let Ok(upstream) = UdpSocket::bind("127.0.0.1:0").await.map(Arc::new) else { continue };
                flows.insert(from, upstream.clone());
                tokio::spawn(back(upstream.clone(), socket.clone(), from, shared.clone(), stop.clone()));
                upstream
            }
            None => continue,
        };
        let datagram = buf.get(..len).map(<[u8]>::to_vec).unwrap_or_default();
        forward(&shared, &upstream, datagram, target);
    }
}

/// Carries the edge's answers on one flow back to the agent that opened it.
async fn back(
    upstream: Arc<UdpSocket>,
    socket: Arc<UdpSocket>,
    agent: SocketAddr,
    shared: Arc<Shared>,
    stop: CancellationToken,
) {
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        let len = tokio::select! {
            () = stop.cancelled() => return,
            received = upstream.recv_from(&mut buf) => match received {
                Ok((len, _)) => len,
                Err(_) => continue,
            },
        };
        let datagram = buf.get(..len).map(<[u8]>::to_vec).unwrap_or_default();
        forward(&shared, &socket, datagram, agent);
    }
}

/// A running TCP impairment proxy; stops when dropped.
pub struct TcpImpairProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    /// `true` while black-holed; connections stop carrying bytes (without closing) while set.
    silence: tokio::sync::watch::Sender<bool>,
    stop: CancellationToken,
}

impl std::fmt::Debug for TcpImpairProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpImpairProxy").field("addr", &self.addr).finish()
    }
}

impl Drop for TcpImpairProxy {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl TcpImpairProxy {
    /// Listens on `127.0.0.1` (a port from the OS) and forwards each connection to `target`,
    /// delaying every chunk by the impairment's delay and jitter (its loss is ignored), drawing
    /// every random decision from `seed`.
    pub async fn start(target: SocketAddr, impairment: Impairment, seed: u64) -> std::io::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared::new(Impairment { loss: 0.0, ..impairment }, seed));
        let (silence, _) = tokio::sync::watch::channel(false);
        let stop = CancellationToken::new();
        let (accept_shared, accept_silence, accept_stop) = (shared.clone(), silence.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                let (inbound, _) = tokio::select! {
                    () = accept_stop.cancelled() => return,
                    accepted = listener.accept() => match accepted {
                        Ok(pair) => pair,
                        Err(_) => continue,
                    },
                };
                let Ok(outbound) = tokio::net::TcpStream::connect(target).await else { continue };
                let _ = (inbound.set_nodelay(true), outbound.set_nodelay(true));
                let (in_read, in_write) = inbound.into_split();
                let (out_read, out_write) = outbound.into_split();
                for (from, to) in [(in_read, out_write), (out_read, in_write)] {
                    let (shared, silence, stop) =
                        (accept_shared.clone(), accept_silence.subscribe(), accept_stop.clone());
                    tokio::spawn(carry(from, to, shared, silence, stop));
                }
            }
        });
        Ok(Self { addr, shared, silence, stop })
    }

    /// The address agents dial instead of the edge.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Changes the delay and jitter from now on.
    pub fn set(&self, impairment: Impairment) {
        if let Ok(mut current) = self.shared.impairment.lock() {
            *current = Impairment { loss: 0.0, ..impairment };
        }
    }

    /// Stops carrying bytes on every connection while `on`, without closing anything.
    pub fn blackhole(&self, on: bool) {
        self.silence.send_replace(on);
    }

    /// Chunks carried so far (`forwarded`); TCP drops nothing.
    pub fn stats(&self) -> &ImpairStats {
        &self.shared.stats
    }
}

/// Carries one direction of one TCP connection: each chunk read is written after its delay, never
/// before an earlier chunk, so the stream stays in order; nothing moves while silenced.
async fn carry(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    shared: Arc<Shared>,
    mut silence: tokio::sync::watch::Receiver<bool>,
    stop: CancellationToken,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (queue, mut due) = tokio::sync::mpsc::unbounded_channel::<(tokio::time::Instant, Vec<u8>)>();
    let writer_silence = silence.clone();
    let writer_shared = shared.clone();
    let writer = tokio::spawn(async move {
        let mut silence = writer_silence;
        while let Some((at, chunk)) = due.recv().await {
            tokio::time::sleep_until(at).await;
            // Held, not dropped, while the link is silent: TCP would retransmit it later.
            while *silence.borrow() {
                if silence.changed().await.is_err() {
                    return;
                }
            }
            if to.write_all(&chunk).await.is_err() {
                return;
            }
            writer_shared.stats.forwarded.fetch_add(1, Ordering::Relaxed);
        }
        let _ = to.shutdown().await;
    });
    let mut buf = vec![0u8; MAX_DATAGRAM];
    let mut last = tokio::time::Instant::now();
    loop {
        while *silence.borrow() {
            tokio::select! {
                () = stop.cancelled() => return writer.abort(),
                changed = silence.changed() => if changed.is_err() { return },
            }
        }
        let len = tokio::select! {
            () = stop.cancelled() => return writer.abort(),
            read = from.read(&mut buf) => match read {
                Ok(0) | Err(_) => break,
                Ok(len) => len,
            },
        };
        let delay = shared.fate().unwrap_or_default();
        last = last.max(tokio::time::Instant::now() + delay);
        if queue.send((last, buf.get(..len).map(<[u8]>::to_vec).unwrap_or_default())).is_err() {
            break;
        }
    }
    drop(queue);
    let _ = writer.await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_makes_the_same_decisions() {
        let impairment = Impairment { loss: 0.05, delay: Duration::from_millis(50), jitter: Duration::from_millis(10) };
        let shared = |seed| Shared::new(impairment, seed);
        let (a, b) = (shared(7), shared(7));
        let fates_a: Vec<_> = (0..1000).map(|_| a.fate()).collect();
        let fates_b: Vec<_> = (0..1000).map(|_| b.fate()).collect();
        assert_eq!(fates_a, fates_b);
        let dropped = fates_a.iter().filter(|f| f.is_none()).count();
        assert!((25..=80).contains(&dropped), "5% of 1000, give or take: {dropped}");
        assert!(fates_a.iter().flatten().all(|d| *d >= Duration::from_millis(40) && *d <= Duration::from_millis(60)));
    }

    #[tokio::test]
    async fn datagrams_pass_both_ways_and_a_blackhole_drops_them() {
        let echo = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let echo_addr = echo.local_addr().unwrap();
        tokio::spawn(async move {
            let mut buf = [0u8; 64];
            while let Ok((len, from)) = echo.recv_from(&mut buf).await {
                let _ = echo.send_to(&buf[..len], from).await;
            }
        });
        let proxy = UdpImpairProxy::start(echo_addr, Impairment::NONE, 1).await.unwrap();
        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        client.send_to(b"ping", proxy.addr()).await.unwrap();
        let mut buf = [0u8; 64];
        let (len, from) =
            tokio::time::timeout(Duration::from_secs(5), client.recv_from(&mut buf)).await.unwrap().unwrap();
        assert_eq!((&buf[..len], from), (&b"ping"[..], proxy.addr()));

        proxy.blackhole(true);
        client.send_to(b"lost", proxy.addr()).await.unwrap();
        assert!(tokio::time::timeout(Duration::from_millis(300), client.recv_from(&mut buf)).await.is_err());
        assert_eq!(proxy.stats().dropped.load(Ordering::Relaxed), 1);
    }

    #[tokio::test]
    async fn tcp_bytes_arrive_in_order_after_the_delay_and_stop_while_black_holed() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let echo = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let echo_addr = echo.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = echo.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = stream.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        let impairment = Impairment { loss: 0.5, delay: Duration::from_millis(30), jitter: Duration::from_millis(20) };
        let proxy = TcpImpairProxy::start(echo_addr, impairment, 3).await.unwrap();
        let mut client = tokio::net::TcpStream::connect(proxy.addr()).await.unwrap();
        let sent: Vec<u8> = (0..20_000u32).map(|i| (i % 251) as u8).collect();
        let started = std::time::Instant::now();
        for chunk in sent.chunks(1000) {
            client.write_all(chunk).await.unwrap();
        }
        let mut back = vec![0u8; sent.len()];
        tokio::time::timeout(Duration::from_secs(10), client.read_exact(&mut back)).await.unwrap().unwrap();
        assert_eq!(back, sent, "every byte, in order, despite jitter and the loss setting");
        assert!(started.elapsed() >= Duration::from_millis(20), "delayed both ways");

        proxy.blackhole(true);
        client.write_all(b"held").await.unwrap();
        let mut four = [0u8; 4];
        assert!(tokio::time::timeout(Duration::from_millis(300), client.read_exact(&mut four)).await.is_err());
        proxy.blackhole(false);
        tokio::time::timeout(Duration::from_secs(5), client.read_exact(&mut four)).await.unwrap().unwrap();
        assert_eq!(&four, b"held", "bytes held during the silence arrive after it");
    }
}

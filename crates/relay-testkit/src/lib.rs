//! acs-relay test kit: the pieces end-to-end tests, the demo and the benchmark are built from.
//!
//! * [`balancer`]: a flow-hashing UDP + TCP load balancer, one address in front of edge replicas;
//! * [`bot`]: a real HTTP + WebSocket echo bot on loopback that records what reaches it (or,
//!   for benchmarks, nothing);
//! * [`acs`]: ACS-shaped traffic: Event Grid IncomingCall, callbacks, and a media call that sends
//!   `AudioData` frames at 50 per second and measures each echo's round trip;
//! * [`bodies`]: a large request and a large response body, with each process's memory growth;
//! * [`client`]: small HTTP helpers, including bodies generated and hashed on the fly;
//! * [`impair`]: a seeded UDP link-impairment proxy (loss, delay, jitter, black hole);
//! * [`netns`]: test hosts in network namespaces, for faults only the kernel can make;
//! * [`procs`]: the real edge and agent as separate processes, for fault tests that kill them;
//! * [`raw`]: raw HTTP/1.1 for requests no client library would send;
//! * [`stack`]: a real edge + paired agent + bot, in process, on ports from the OS;
//! * [`stats`]: latency percentiles;
//! * [`transport`]: tests defined once and run over both tunnel transports;
//! * [`wait`]: `eventually`, so tests wait on conditions with deadlines instead of sleeping.

pub mod acs;
pub mod acs_signer;
pub mod balancer;
pub mod bodies;
pub mod bot;
pub mod client;
pub mod impair;
pub mod netns;
pub mod procs;
pub mod raw;
pub mod stack;
pub mod stats;
pub mod transport;
pub mod wait;

pub use stack::Stack;
pub use wait::eventually;

//! relay-bench: measures what acs-relay costs a voice bot. It plays ACS at a bot or at an edge
//! (N concurrent media calls at 50 frames a second each way, callbacks, and webhook bursts) and
//! compares, in one run, the bot reached directly with the bot reached through a freshly paired
//! edge + agent, reading each process's CPU and memory from `/proc`. The bot, the ACS media
//! model, the percentiles and the process handling are the test kit's ([`relay_testkit`]), so
//! the benchmark measures the same calls the tests check.
//!
//! * [`media`]: the call load and its per-frame measurements;
//! * [`webhooks`]: the webhook load;
//! * [`procstat`]: CPU and memory of other processes;
//! * [`compare`]: the side-by-side run and its table;
//! * [`cost`]: the cost model (per frame, per webhook, per open call) drawn from a run;
//! * [`hostile`]: what the attacks the edge must survive cost the real binaries.

pub mod compare;
pub mod cost;
pub mod hostile;
pub mod media;
pub mod procstat;
pub mod webhooks;

//! Guards for a public HTTP listener on a hostile internet: the mechanisms the edge puts in front
//! of everything it admits, none of which knows about ACS, agents or routes.
//!
//! * [`conn_limit`]: client connections held open, in total and per source address;
//! * [`rate_limit`]: requests a second per source address (a token bucket each; time passed in);
//! * [`target`]: request targets that mean exactly what they say (no dot segments, encoded
//!   separators or control bytes), so a route cannot be reached under another's name;
//! * [`request_body`]: a body that must keep arriving, or the request is answered 408;
//! * [`linger`]: lingering close, so a client that is still sending reads the early answer
//!   (413, 431, 408) instead of a reset.
//!
//! The edge decides the numbers and what to answer; these only enforce.

pub mod conn_limit;
pub mod linger;
pub mod rate_limit;
pub mod request_body;
pub mod target;

//! relay-record: what the agent shows of the calls it relays, on request.
//!
//! The agent can keep its last webhook exchanges for inspection and record whole calls (every
//! webhook, the media WebSocket's upgrade and every frame each way, with time offsets). This
//! crate owns what both are made of and how they are read back: the JSON-lines [`format`], the
//! [`redact`]ion applied before anything is kept (credentials and query values never leave the
//! agent), the [`capture`] of a body while it streams past up to a bound, and the [`play`]er that
//! replays a recording against a bot and reports where the bot's answers differ from the
//! recorded ones. It does no tunnel I/O: the agent feeds it what passed.

pub mod capture;
pub mod format;
pub mod play;
pub mod redact;

pub use capture::{Capture, Tap};
pub use format::{Body, Entry, Frame, FrameData, MediaClose, MediaOpen, Meta, Side, Webhook};
pub use play::{PlayError, PlayOptions, PlayReport, ReadError, Recording, play};
pub use redact::Redactor;

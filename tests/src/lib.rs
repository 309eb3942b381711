//! End-to-end tests live in `tests/`; this crate has no library code. Its two binaries,
//! `e2e-edge` and `e2e-agent`, are the real command lines built here so fault tests can run them
//! as processes.

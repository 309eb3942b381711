//! Which tunnel transport a test runs over. [`over_both_transports!`] defines a test once and
//! runs it twice, as `name::quic` and `name::tcp`; inside, [`current`] says which, and the
//! [`crate::Stack`] pairs and starts its agents over it. Tests written without the macro run
//! over QUIC, the default.

pub use relay_transport::Transport;

tokio::task_local! {
    static TRANSPORT: Transport;
}

/// The transport the running test is parameterised over (QUIC outside [`over_both_transports!`]).
pub fn current() -> Transport {
    TRANSPORT.try_with(|transport| *transport).unwrap_or(Transport::Quic)
}

/// Runs `test` with [`current`] answering `transport`.
pub async fn run_over<F: std::future::Future>(transport: Transport, test: F) -> F::Output {
    TRANSPORT.scope(transport, test).await
}

/// Defines an async end-to-end test once and runs it over each tunnel transport, as the tests
/// `name::quic` and `name::tcp`:
///
/// ```ignore
/// over_both_transports! {
///     async fn webhook_round_trip_is_byte_exact() {
///         let stack = Stack::start().await.unwrap();
///         // ...
///     }
/// }
/// ```
///
/// `multi_thread async fn` runs each on a two-worker runtime instead of the current thread.
#[macro_export]
macro_rules! over_both_transports {
    ($(#[$attr:meta])* async fn $name:ident() $body:block) => {
        $crate::over_both_transports!(@define [tokio::test] $(#[$attr])* $name $body);
    };
    ($(#[$attr:meta])* multi_thread async fn $name:ident() $body:block) => {
        $crate::over_both_transports!(
            @define [tokio::test(flavor = "multi_thread", worker_threads = 2)] $(#[$attr])* $name $body
        );
    };
    (@define [$($test:tt)*] $(#[$attr:meta])* $name:ident $body:block) => {
        $(#[$attr])*
        mod $name {
            #[allow(unused_imports)]
            use super::*;

            #[$($test)*]
            async fn quic() {
                $crate::transport::run_over($crate::transport::Transport::Quic, async $body).await
            }

            #[$($test)*]
            async fn tcp() {
                $crate::transport::run_over($crate::transport::Transport::Tcp, async $body).await
            }
        }
    };
}

/// Pairing options for the test's transport.
pub fn pairing() -> relay_agent::PairTransport {
    relay_agent::PairTransport { choice: relay_agent::TransportChoice::Only(current()), ..Default::default() }
}

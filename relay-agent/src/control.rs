//! What the agent does on a connection's control stream after the welcome: tell the edge when a
//! drain starts (the whole agent's, or this connection's when it is being retired), and renew the
//! agent's certificate whenever two thirds of its life have passed. New certificates are stored
//! atomically and used by the next connection; the current one, and every exchange on it,
//! carries on untouched.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use relay_pki::{AgentState, agent_name_from_cert, cert_validity, generate_agent_csr, renewal_due};
use relay_proto::RenewOutcome;
use relay_tunnel::control::{AgentControl, ControlError};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::metrics::OutcomeLabels;
use crate::tunnel::TunnelClient;

/// How long an edge has to confirm a drain notice. It answers as soon as it reads it, within a
/// round trip; two seconds is many round trips and still short against a platform's grace.
pub(crate) const DRAIN_NOTICE_TIMEOUT: Duration = Duration::from_secs(2);

/// How long the edge has to answer a renewal request.
const RENEW_ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

/// Shortest wait before retrying a failed renewal; the retry interval is a tenth of the
/// certificate's remaining life, but never less than this nor more than [`RENEW_RETRY_MAX`].
const RENEW_RETRY_MIN: Duration = Duration::from_secs(1);

/// Longest wait before retrying a failed renewal.
const RENEW_RETRY_MAX: Duration = Duration::from_secs(300);

/// Owns the control stream for the life of a connection; `drain` is cancelled when the edge must
/// be told to send nothing new here.
pub(crate) async fn run(client: Arc<TunnelClient>, mut control: AgentControl, drain: CancellationToken) {
    let mut drain_sent = false;
    loop {
        if drain.is_cancelled() && !drain_sent {
            drain_sent = true;
            announce_drain(&client, &mut control).await;
        }
        let Some((not_before, not_after)) = client.validity() else {
            warn!("cannot read this agent's certificate validity; not renewing");
            return;
        };
        let now = SystemTime::now();
        if !renewal_due(not_before, not_after, now) {
            let lifetime = not_after.duration_since(not_before).unwrap_or_default();
            let due = not_before + lifetime.mul_f64(2.0 / 3.0);
            let until_due = tokio::time::sleep(due.duration_since(now).unwrap_or_default());
            let drain_pending =
                async { if drain_sent { std::future::pending().await } else { drain.cancelled().await } };
            tokio::select! {
                () = until_due => {}
                () = drain_pending => {}
            }
            continue;
        }
        // Connections to other replicas run this loop too: the first to take the lock renews, the
        // others find the fresh certificate not due and go back to sleep.
        let guard = client.renew_lock.lock().await;
        if client.validity().is_none_or(|(from, until)| !renewal_due(from, until, SystemTime::now())) {
            drop(guard);
            continue;
        }
        let outcome = renew_once(&client, &mut control).await;
        drop(guard);
        let label = match &outcome {
            Ok(_) => "issued",
            Err(Renewal::ConnectionGone(_)) => "interrupted",
            Err(Renewal::Failed(_)) => "refused",
        };
        client.metrics.renewals.get_or_create(&OutcomeLabels { outcome: label }).inc();
        match outcome {
            Ok(until) => info!(valid_until = %humantime::format_rfc3339_seconds(until), "certificate renewed"),
            Err(Renewal::ConnectionGone(e)) => {
                warn!("renewal interrupted, will retry on the next connection: {e}");
                return;
            }
            Err(Renewal::Failed(e)) => {
                let left = not_after.duration_since(SystemTime::now()).unwrap_or_default();
                let retry = (left / 10).clamp(RENEW_RETRY_MIN, RENEW_RETRY_MAX);
                warn!(retry_in_s = retry.as_secs(), "certificate renewal failed: {e}");
                tokio::time::sleep(retry).await;
            }
        }
    }
}

/// Tells the edge about the drain and counts its confirmation; until it comes the edge may still
/// send a new exchange here.
async fn announce_drain(client: &TunnelClient, control: &mut AgentControl) {
    match control.drain(DRAIN_NOTICE_TIMEOUT).await {
        Ok(()) => {
            client.drain_acks.send_modify(|n| *n += 1);
            info!("draining: the edge sends this agent no new exchanges");
        }
        Err(e) => warn!("the edge did not confirm the drain: {e}"),
    }
}

enum Renewal {
    /// The control stream or connection failed; a new connection will retry.
    ConnectionGone(String),
    /// The edge refused, or the result could not be stored; retry later on this connection.
    Failed(String),
}

async fn renew_once(client: &TunnelClient, control: &mut AgentControl) -> Result<SystemTime, Renewal> {
    let name = client
        .identity
        .read()
        .map(|id| id.name.clone())
        .map_err(|_| Renewal::Failed("identity lock poisoned".into()))?;
    let (key_pem, csr_der) = generate_agent_csr(&name).map_err(|e| Renewal::Failed(e.to_string()))?;
    let cert_der = match control.renew(csr_der, RENEW_ANSWER_TIMEOUT).await {
        Ok(RenewOutcome::Issued { cert_der }) => cert_der,
        Ok(RenewOutcome::Refused(reason)) => return Err(Renewal::Failed(format!("the edge refused: {reason}"))),
        Err(e @ (ControlError::Stream(_) | ControlError::Timeout(_) | ControlError::Unexpected(_))) => {
            return Err(Renewal::ConnectionGone(e.to_string()));
        }
    };
    if agent_name_from_cert(&cert_der).ok().as_deref() != Some(name.as_str()) {
        return Err(Renewal::Failed("the renewed certificate names another agent".into()));
    }
    let (_, not_after) = cert_validity(&cert_der).map_err(|e| Renewal::Failed(e.to_string()))?;
    if let Some(dir) = &client.state_dir {
        AgentState::save_renewed(dir, &key_pem, &cert_der).map_err(|e| Renewal::Failed(e.to_string()))?;
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|e| Renewal::Failed(e.to_string()))?;
    if let Ok(mut identity) = client.identity.write() {
        identity.cert_chain = vec![CertificateDer::from(cert_der)];
        identity.key = key;
    }
    Ok(not_after)
}

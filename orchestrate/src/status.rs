//! A run's status from its coordinator (`GetStatus`), and the form `ril status`, `ril train`
//! and the demo print it in.

use std::time::Duration;

use ril_proto::error::{RpcError, ServiceErrorCode};
use ril_proto::security::Security;
use ril_proto::v1;

use crate::error::Result;

/// Fetches the run's status.
pub async fn fetch_status(
    addr: &str,
    timeout: Duration,
    security: &Security,
) -> Result<v1::RunStatus> {
    let channel = ril_proto::client::connect(addr, timeout, security).await?;
    let mut client = ril_proto::client::coordinator(channel);
    let reply = tokio::time::timeout(timeout, client.get_status(v1::GetStatusRequest {}))
        .await
        .map_err(|_| {
            RpcError::local(
                "coordinator",
                addr,
                "GetStatus",
                ServiceErrorCode::DeadlineExceeded.grpc_code(),
                format!("no answer within {timeout:?}"),
            )
        })?
        .map_err(|status| RpcError::new("coordinator", addr, "GetStatus", status))?;
    Ok(reply.into_inner())
}

/// Shown once the run has gone this long without progress.
const QUIET_MS: u64 = 10_000;

/// The watchdog's lines: what the run waits for once it has not advanced for a while, the
/// error it stopped with, and the latest question handed back.
fn format_progress(s: &v1::RunStatus) -> String {
    let mut out = String::new();
    if !s.stalled.is_empty() {
        out.push_str(&format!("STALLED: {}\n", s.stalled));
    } else if !s.finished && s.ms_since_progress >= QUIET_MS && !s.waiting_for.is_empty() {
        out.push_str(&format!(
            "no progress for {} s: {}\n",
            s.ms_since_progress / 1000,
            s.waiting_for
        ));
    }
    if s.metrics.get("d_train_failed").is_some_and(|&v| v > 0.0) {
        out.push_str(
            "discriminator: its Train failed at the last step (D's update for that iteration was \
             lost; the policy trained on)\n",
        );
    }
    if !s.last_handback.is_empty() {
        out.push_str(&format!(
            "last question handed back {} s ago: {}\n",
            s.last_handback_ms_ago / 1000,
            s.last_handback
        ));
    }
    out
}

pub fn format_status(s: &v1::RunStatus) -> String {
    let mut out = format!(
        "run {}: iteration {}/{} (policy version {}){}\n\
         groups accepted {}, duplicates refused {}, leases expired {}, outstanding {}, {:.2} groups/s\n\
         learner ranks {}/{}\n",
        s.run_id,
        s.iteration,
        s.total_iterations,
        s.policy_version,
        if s.finished { ", finished" } else { "" },
        s.groups_accepted,
        s.duplicates_refused,
        s.leases_expired,
        s.leases_outstanding,
        s.groups_per_second,
        s.learner_ranks_joined,
        s.learner_world_size,
    );
    out.push_str(&format_progress(s));
    let alive = s.actors.iter().filter(|a| a.alive).count();
    out.push_str(&format!("actors: {alive} alive of {}\n", s.actors.len()));
    for a in &s.actors {
        out.push_str(&format!(
            "  {} ({}) version {} seen {} ms ago, {} questions{}\n",
            a.actor_id,
            a.device,
            a.policy_version,
            a.last_seen_ms_ago,
            a.groups_leased,
            if a.alive { "" } else { ", gone" }
        ));
    }
    if !s.metrics.is_empty() {
        out.push_str("last step:\n");
        let mut m: Vec<_> = s.metrics.iter().collect();
        m.sort_by(|a, b| a.0.cmp(b.0));
        for (k, v) in m {
            out.push_str(&format!("  {k} = {v:.6}\n"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status() -> v1::RunStatus {
        v1::RunStatus {
            run_id: "r".into(),
            total_iterations: 10,
            waiting_for: "iteration 3: 1 of 4 groups accepted; waiting for actors".into(),
            ..Default::default()
        }
    }

    #[test]
    fn status_says_what_a_quiet_run_waits_for_and_why_it_stalled() {
        let mut s = status();
        s.ms_since_progress = 9_000;
        let text = format_status(&s);
        assert!(
            !text.contains("no progress"),
            "quiet for less than 10 s: {text}"
        );
        s.ms_since_progress = 42_000;
        s.last_handback = "position 7 handed back by the learner: too stale".into();
        s.last_handback_ms_ago = 3_000;
        let text = format_status(&s);
        assert!(
            text.contains(
                "no progress for 42 s: iteration 3: 1 of 4 groups accepted; waiting for actors\n"
            ) && text.contains(
                "last question handed back 3 s ago: position 7 handed back by the learner: too stale\n"
            ),
            "{text}"
        );
        s.metrics.insert("d_train_failed".into(), 1.0);
        assert!(format_status(&s).contains("discriminator: its Train failed at the last step"));
        s.stalled = "no progress for 1800 s ...".into();
        let text = format_status(&s);
        assert!(
            text.contains("STALLED: no progress for 1800 s ...\n")
                && !text.contains("no progress for 42 s"),
            "{text}"
        );
    }
}

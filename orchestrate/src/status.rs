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

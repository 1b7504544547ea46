//! Waiting on a state instead of sleeping: the one `wait_until` of ril's tests and supervisors.

use std::future::Future;
use std::time::{Duration, Instant};

/// How often [`wait_until`] asks again.
pub const POLL_EVERY: Duration = Duration::from_millis(20);

/// Polls `predicate` every [`POLL_EVERY`] until it holds, or panics after `timeout` with
/// "timed out after ... waiting for {what}" (a test helper: the panic is the test's failure).
pub async fn wait_until<F, Fut>(what: &str, timeout: Duration, mut predicate: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    if let Err(e) = try_wait_until(what, timeout, &mut predicate).await {
        panic!("{e}");
    }
}

/// [`wait_until`] that returns the timeout as an error instead of panicking.
pub async fn try_wait_until<F, Fut>(
    what: &str,
    timeout: Duration,
    mut predicate: F,
) -> Result<(), WaitTimeout>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let started = Instant::now();
    loop {
        if predicate().await {
            return Ok(());
        }
        if started.elapsed() >= timeout {
            return Err(WaitTimeout {
                what: what.to_string(),
                timeout,
            });
        }
        tokio::time::sleep(POLL_EVERY).await;
    }
}

/// What [`try_wait_until`] was waiting for when its time ran out.
#[derive(Debug, Clone, thiserror::Error)]
#[error("timed out after {timeout:?} waiting for {what}")]
pub struct WaitTimeout {
    pub what: String,
    pub timeout: Duration,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[tokio::test]
    async fn returns_once_the_predicate_holds() {
        let calls = Arc::new(AtomicU32::new(0));
        let c = calls.clone();
        wait_until("the third call", Duration::from_secs(5), move || {
            let c = c.clone();
            async move { c.fetch_add(1, Ordering::SeqCst) >= 2 }
        })
        .await;
        assert_eq!(calls.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn a_timeout_names_what_was_awaited() {
        let e = try_wait_until("the moon", Duration::from_millis(50), || async { false })
            .await
            .unwrap_err();
        assert!(e.to_string().contains("waiting for the moon"), "{e}");
    }

    #[tokio::test]
    #[should_panic(expected = "waiting for nothing that comes")]
    async fn wait_until_panics_on_timeout() {
        wait_until("nothing that comes", Duration::from_millis(30), || async {
            false
        })
        .await;
    }
}

//! Who reaches whom, checked the way the NetworkPolicy tests need it: a request answered by the
//! expected pod, a request dropped (a timeout: a policy drops, it does not refuse), and waits
//! for either while an agent applies a changed manifest.

use std::{net::SocketAddr, time::Duration};

use crate::{client::RequestError, retry_until, Pod};

/// How long an allowed request may take.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a probe waits before calling a request dropped.
pub const DROP_PROBE: Duration = Duration::from_millis(600);
/// How long an agent is given to apply a changed manifest.
pub const APPLY: Duration = Duration::from_secs(10);

/// One TCP request from `from` to `to`, answered by `by`.
pub fn assert_answered(from: &Pod, to: SocketAddr, by: &Pod) {
    let reply = from
        .tcp_request_any(to, ANSWER_TIMEOUT)
        .unwrap_or_else(|e| panic!("{} -> {to}: {e}", from.name()));
    assert_eq!(reply.text, by.name(), "{} -> {to}", from.name());
}

/// One TCP request from `from` to `to`, dropped.
pub fn assert_dropped(from: &Pod, to: SocketAddr) {
    let answer = from.tcp_request_any(to, DROP_PROBE);
    assert!(
        matches!(answer, Err(RequestError::Timeout)),
        "{} -> {to} should be dropped, got {answer:?}",
        from.name()
    );
}

/// Waits until `from` -> `to` is dropped.
pub fn wait_dropped(from: &Pod, to: SocketAddr) {
    retry_until(APPLY, Duration::from_millis(100), || {
        match from.tcp_request_any(to, DROP_PROBE) {
            Err(RequestError::Timeout) => Ok(()),
            other => Err(anyhow::anyhow!("{} -> {to}: {other:?}", from.name())),
        }
    })
    .unwrap();
}

/// Waits until `from` -> `to` is answered by `by`.
pub fn wait_answered(from: &Pod, to: SocketAddr, by: &Pod) {
    retry_until(APPLY, Duration::from_millis(100), || {
        let reply = from
            .tcp_request_any(to, DROP_PROBE)
            .map_err(|e| anyhow::anyhow!("{} -> {to}: {e}", from.name()))?;
        anyhow::ensure!(reply.text == by.name(), "answered by {}", reply.text);
        Ok(())
    })
    .unwrap();
}

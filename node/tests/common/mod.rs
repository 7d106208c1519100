//! Helpers shared by the node's integration tests.

use std::time::Duration;

use trellis_node::agent::NodeAgent;

/// The agent's `/metrics` page.
pub async fn metrics_text(agent: &NodeAgent) -> String {
    let addr = agent.metrics_addr().unwrap();
    reqwest::get(format!("http://{addr}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// Polls `cond` every 100 ms for at most `limit`.
pub async fn eventually<F, Fut>(limit: Duration, mut cond: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    while tokio::time::Instant::now() < deadline {
        if cond().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

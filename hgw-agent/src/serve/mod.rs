//! What the running agent answers: `hgw-agent status` on a Unix socket (`status`), and
//! on `metrics_addr` Prometheus metrics (`metrics`), `/healthz` and `/readyz` over
//! HTTP (`http`). Both read the snapshot the agent's loop publishes and never wait for
//! the loop, but for `/healthz`, which asks it.

pub mod http;
pub mod metrics;
pub mod status;

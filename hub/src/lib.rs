//! The Trellis hub and the operator CLI.
//!
//! A hub accepts relay uplinks over QUIC, applies their records at most once,
//! keeps the fleet view (region → site → latest summary, with when it was
//! last heard) and serves it over an HTTP JSON API with `/metrics`. The
//! `trellis` binary is the operator's CLI: it manages the mesh CA, reads the
//! API, and starts a whole local mesh in one process (`trellis up`).
//!
//! # Layout
//! - [`core`]: the sans-IO hub core: at-most-once apply, the fleet view.
//! - [`log`]: the replicated management log, hash-chained per origin, and
//!   the desired state it folds into; pure.
//! - [`audit`]: checking the stored log: signatures, readable columns,
//!   each origin's chain.
//! - [`federation`]: what hubs tell each other in their gossip.
//! - [`incidents`]: correlating events and the fleet view into incidents;
//!   pure.
//! - [`incidentdriver`]: the task that owns the incidents, and webhooks.
//! - [`replication`]: the hub ↔ hub replication protocol and client.
//! - [`peering`]: the federation task, replication server, pushes,
//!   pulls and quorum writes.
//! - [`driver`]: the hub process: endpoint, per-relay tasks, the core task.
//! - [`fleetmetrics`]: the fleet as Prometheus gauges (nodes and sites by
//!   status, rollout progress, uplink lag).
//! - [`api`]: HTTP routes and the JSON types they return.
//! - [`dashboard`]: the web dashboard served at `/`: static files.
//! - [`store`]: the durable store (SQLite): records from relays, history.
//! - [`config`]: the hub's TOML configuration.
//! - [`client`]: the CLI's HTTP client for the API.
//! - [`render`]: the CLI's human-readable output.
//! - [`rollout`]: where the fleet stands with one configuration version,
//!   for `trellis config apply`'s progress; pure.
//! - [`up`]: `trellis up`, a real local mesh in one process.

pub mod api;
pub mod apiauth;
pub mod audit;
pub mod baselines;
pub mod client;
pub mod config;
pub mod core;
pub mod dashboard;
pub mod driver;
pub mod enrolapi;
pub mod federation;
pub mod fleetmetrics;
pub mod incidentdriver;
pub mod incidents;
pub mod inventory;
pub mod log;
pub mod outliers;
pub mod patchdriver;
pub mod patchrollout;
pub mod peering;
pub mod render;
pub mod replication;
pub mod revokeapi;
pub mod rollout;
pub mod rolloutapi;
pub mod store;
pub mod up;

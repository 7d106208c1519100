//! The Trellis relay: one per site. A member of the site's gossip, it turns
//! what gossip shows into compact, mergeable [`summary::SiteSummary`]s and
//! events, keeps them until a hub acknowledges them, and answers the hub's
//! requests about its site.
//!
//! # Layout
//! - [`summary`]: `SiteSummary`, `Rollup` (last-writer-wins by site) and
//!   `Totals`; the merge laws are property-tested.
//! - [`summarise`]: `SiteView` → `SiteSummary`; pure.
//! - [`uplink`]: the relay ↔ hub protocol messages.
//! - [`buffer`]: the durable outage buffer (SQLite), bounded by
//!   downsampling and gaps.
//! - [`core`]: the sans-IO relay core (records, sequence numbers, acks).
//! - [`outliers`]: nodes far above their same-labelled peers, as
//!   `outlier:METRIC` checks; pure, fed by the core.
//! - [`config`]: the relay's TOML configuration.
//! - [`artifacts`]: patch artifacts kept for the site, fetched from the
//!   hub once, chunk by chunk, resumable.
//! - [`configcache`]: the newest configuration bundle, kept on disk and
//!   offered to the site.
//! - [`report`]: the JSON shapes of the hub's and the relay's read APIs.
//! - [`api`]: the relay's local read API.
//! - [`failover`]: which hub to use, when to leave it and when to go back.
//! - [`pace`]: the token bucket that paces the backlog replay.
//! - [`driver`]: the relay process: gossip, the core's task, the uplink.

pub mod api;
pub mod artifacts;
pub mod buffer;
pub mod config;
pub mod configcache;
pub mod core;
pub mod departures;
pub mod driver;
pub mod enrolment;
pub mod failover;
pub mod outliers;
pub mod pace;
pub mod report;
pub mod revocations;
pub mod rollout;
pub mod summarise;
pub mod summary;
pub mod uplink;

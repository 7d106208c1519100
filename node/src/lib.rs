//! Trellis's base library and the node agent.
//!
//! Everything the other tiers build on lives here: identities and the mesh
//! CA, the frame codec, the QUIC endpoint with mutual TLS and authorisation,
//! chitchat gossip over QUIC, health probes, the engine that applies managed
//! files and heals their drift, the core of patches and their rollout
//! waves, and the agent that ties them together on
//! every managed machine. Relays and hubs are nodes with more
//! duties and reuse all of it.
//!
//! # Layout
//! - [`id`]: roles and identities, and the names allowed in them.
//! - [`tls`]: the mesh CA, issuing certificates, rustls/quinn configs.
//! - [`authz`]: who may speak which protocol (ALPN) with whom; pure.
//! - [`wire`]: the length-prefixed, versioned, size-limited frame codec.
//! - [`enrol`]: join tokens, and a machine's enrolment through its relay.
//! - [`endpoint`]: one QUIC endpoint per member; admits, authorises and
//!   routes connections by protocol.
//! - [`site`]: `SiteView`, `Health`: the seam between gossip and the rest.
//! - [`gossip`]: chitchat's transport over QUIC and the site's gossip.
//! - [`health`]: resource sampling, user checks, and their assessment.
//! - [`foresight`]: anomalies in a member's own figures and forecasts of
//!   what runs out (disk, memory, certificate); pure.
//! - [`managed`]: the files one node must hold (`ManagedState`), between
//!   resolving the fleet's configuration and applying it.
//! - [`desired`]: the fleet's configuration as a directory of TOML
//!   manifests; selectors, precedence, templates, resolution per node, plans.
//! - [`bundle`]: a fleet version signed by an operator's Ed25519 key, and
//!   its verification.
//! - [`signature`]: the operator-signature rules shared by everything
//!   signed as desired state.
//! - [`patch`]: patches: the patch directory and its signed manifest,
//!   the content-addressed chunk store, and the download state machine.
//! - [`waves`]: rollout waves (which nodes in which order) and the health
//!   gate between them; pure.
//! - [`distribute`]: a version inside a site: the relay's offer in gossip,
//!   the fetch protocol, and what nodes report back in gossip.
//! - [`patchstate`]: a patch rollout in a site's gossip: the relay's
//!   order and each node's state.
//! - [`patching`]: the node's patch engine: install, bake, roll back,
//!   report.
//! - [`apply`]: makes the machine hold a `ManagedState` (atomic writes,
//!   reload commands) and keeps it so (drift checks, healing).
//! - [`config`]: TOML configuration with validation.
//! - [`metrics`]: Prometheus counters and the `/metrics` server.
//! - [`agent`]: the node agent driver.
//! - [`upgrade`]: the agent's own builds on a machine, its version stamp,
//!   and the restart into another build (self-upgrade by patch).
//! - [`runbook`]: remediation rules, their rails and the site's leases;
//!   pure.
//! - [`remediate`]: the node's runbook task (leases, actions, audit file).
//! - [`cli`]: logging, signals and exit codes shared by the binaries.
//! - [`clock`]: the wall clock, for drivers only.

pub mod agent;
pub mod apply;
pub mod authz;
pub mod bundle;
pub mod cli;
pub mod clock;
pub mod config;
pub mod desired;
pub mod distribute;
pub mod endpoint;
pub mod enrol;
pub mod foresight;
pub mod gossip;
pub mod gossip_codec;
pub mod health;
pub mod http;
pub mod id;
pub mod managed;
pub mod metrics;
pub mod patch;
pub mod patching;
pub mod patchstate;
pub mod remediate;
pub mod revocation;
pub mod runbook;
pub mod signature;
pub mod site;
pub mod tls;
pub mod upgrade;
pub mod waves;
pub mod wire;

//! Who may speak which protocol with whom.
//!
//! TLS has already proved that a peer holds a certificate of the mesh CA;
//! this module decides, from the two identities and the protocol (ALPN),
//! whether the connection may go on. It is a pure function so the whole
//! table can be tested cell by cell. Both ends check: the server checks the
//! client that connected, the client checks the server it reached.

use std::fmt;
use std::ops::RangeInclusive;

use crate::id::{Identity, Role};

/// The mesh protocol version this build speaks best. Every ALPN carries it
/// (`trellis-uplink/2`); it goes up when any protocol's wire format changes
/// in a way an older member cannot read. Version 2: gossip digests code a
/// member whose keys changed in two bytes (`gossip_codec`, kind 2); every
/// other protocol is as at version 1.
pub const PROTOCOL_VERSION: u16 = 2;
/// The oldest mesh protocol version this build still speaks. Keeping it one
/// step behind [`PROTOCOL_VERSION`] is what lets a fleet upgrade a member
/// at a time: old and new members settle on the older version.
pub const OLDEST_PROTOCOL_VERSION: u16 = 1;

/// The protocol versions a member speaks.
pub fn spoken_versions() -> RangeInclusive<u16> {
    OLDEST_PROTOCOL_VERSION..=PROTOCOL_VERSION
}

/// A protocol spoken over the mesh, one ALPN each.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    /// chitchat gossip inside one site (node ↔ node, node ↔ relay).
    Gossip,
    /// relay → hub summaries and events; hub → relay drill-down requests.
    Uplink,
    /// chitchat among hubs: membership, which hub serves which site.
    Federation,
    /// hub ↔ hub: relay records and the management log, pushed and pulled.
    Replication,
    /// node → its site's relay: the signed configuration bundle the relay
    /// announces in gossip.
    Fetch,
}

impl Protocol {
    pub const ALL: [Protocol; 5] = [
        Protocol::Gossip,
        Protocol::Uplink,
        Protocol::Federation,
        Protocol::Replication,
        Protocol::Fetch,
    ];

    /// The ALPN name without its version.
    pub fn alpn_name(self) -> &'static str {
        match self {
            Protocol::Gossip => "trellis-gossip",
            Protocol::Uplink => "trellis-uplink",
            Protocol::Federation => "trellis-federation",
            Protocol::Replication => "trellis-replication",
            Protocol::Fetch => "trellis-fetch",
        }
    }

    /// The ALPN of this protocol at `version` (`trellis-uplink/1`).
    pub fn alpn_at(self, version: u16) -> Vec<u8> {
        format!("{}/{version}", self.alpn_name()).into_bytes()
    }

    /// The ALPN at this build's [`PROTOCOL_VERSION`].
    pub fn alpn(self) -> Vec<u8> {
        self.alpn_at(PROTOCOL_VERSION)
    }

    /// The ALPNs for every version in `versions`, newest first: what a
    /// member offers, and the order in which a server picks (TLS servers
    /// take the first of their own list that the client offered, so two
    /// members settle on the newest version both speak).
    pub fn alpns(self, versions: &RangeInclusive<u16>) -> Vec<Vec<u8>> {
        versions.clone().rev().map(|v| self.alpn_at(v)).collect()
    }

    /// The protocol and version an ALPN names.
    pub fn from_alpn(alpn: &[u8]) -> Option<(Self, u16)> {
        let text = std::str::from_utf8(alpn).ok()?;
        let (name, version) = text.rsplit_once('/')?;
        let version: u16 = version.parse().ok()?;
        Protocol::ALL
            .into_iter()
            .find(|p| p.alpn_name() == name)
            .map(|p| (p, version))
    }

    /// Whether connections of this protocol move bulk data (artifact
    /// chunks), so are worth datagrams larger than an Ethernet path's
    /// ([`crate::tls::MAX_UDP_PAYLOAD`]). Gossip and federation exchange
    /// small messages with many peers, and quinn sizes each connection's
    /// send buffer by its datagrams. Uplink and replication also move bulk
    /// (a replayed outage buffer, a hub's log catch-up) but keep an
    /// Ethernet path's datagrams for now: with the larger bound, a relay
    /// that sent the hub a bad first frame sometimes saw its uplink end in
    /// a stateless reset instead of the hub's close (the hostile-frames
    /// test, 3 of 8 runs), for a reason not yet found.
    pub fn carries_bulk(self) -> bool {
        self == Protocol::Fetch
    }

    /// The streams a peer may keep open toward us at once on one
    /// connection of this protocol. Gossip runs on one unidirectional
    /// stream each way (a new one only after an error ends the last;
    /// older members open one per message, which ends as soon as it is
    /// read, hence room for 16); every other protocol asks and answers on
    /// bidirectional streams.
    pub fn peer_streams(self) -> PeerStreams {
        match self {
            Protocol::Gossip | Protocol::Federation => PeerStreams { bidi: 0, uni: 16 },
            Protocol::Uplink | Protocol::Replication | Protocol::Fetch => PeerStreams {
                bidi: PeerStreams::QUINN_DEFAULT.bidi,
                uni: 0,
            },
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Gossip => "gossip",
            Protocol::Uplink => "uplink",
            Protocol::Federation => "federation",
            Protocol::Replication => "replication",
            Protocol::Fetch => "fetch",
        }
    }
}

/// How many streams of each kind a peer may have open toward us at once
/// on one connection. quinn sets aside a slot for every stream a peer may
/// open as soon as a connection starts (about 8 KB a connection at its
/// default of 100 of each), and a member of a site holds a connection to
/// each of its peers, so each protocol asks only for what it uses
/// ([`Protocol::peer_streams`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerStreams {
    pub bidi: u32,
    pub uni: u32,
}

impl PeerStreams {
    /// quinn's own default.
    pub const QUINN_DEFAULT: PeerStreams = PeerStreams {
        bidi: 100,
        uni: 100,
    };

    /// Enough for every protocol in `protocols` (a server serves several
    /// on one configuration).
    pub fn enough_for(protocols: &[Protocol]) -> PeerStreams {
        protocols
            .iter()
            .fold(PeerStreams { bidi: 0, uni: 0 }, |a, p| {
                let b = p.peer_streams();
                PeerStreams {
                    bidi: a.bidi.max(b.bidi),
                    uni: a.uni.max(b.uni),
                }
            })
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which end of the connection we are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// We accepted the connection; the peer is the client.
    Server,
    /// We opened the connection; the peer is the server.
    Client,
}

/// Why a peer was refused. The connection is closed; no state was touched.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("{peer} may not speak {protocol} with {local}")]
    WrongRole {
        protocol: Protocol,
        local: Box<Identity>,
        peer: Box<Identity>,
    },
    #[error("{peer} is not in the site of {local}; {protocol} stays inside a site")]
    WrongSite {
        protocol: Protocol,
        local: Box<Identity>,
        peer: Box<Identity>,
    },
    /// The peer's certificate is on the revocation list
    /// ([`crate::revocation`]).
    #[error("the certificate of {0} is revoked")]
    Revoked(Box<Identity>),
}

impl Refusal {
    /// A short, stable label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Refusal::WrongRole { .. } => "wrong_role",
            Refusal::WrongSite { .. } => "wrong_site",
            Refusal::Revoked(_) => "revoked",
        }
    }
}

/// The protocols a member of `role` serves, that is accepts connections
/// for. A connection asking for any other ALPN fails its TLS handshake.
pub fn served_by(role: Role) -> &'static [Protocol] {
    match role {
        Role::Node => &[Protocol::Gossip],
        Role::Relay => &[Protocol::Gossip, Protocol::Fetch],
        Role::Hub => &[
            Protocol::Uplink,
            Protocol::Federation,
            Protocol::Replication,
        ],
        Role::Operator => &[],
    }
}

/// Decides whether `peer` may speak `protocol` with `local`.
pub fn authorize(
    protocol: Protocol,
    side: Side,
    local: &Identity,
    peer: &Identity,
) -> Result<(), Refusal> {
    let role = |ok: bool| {
        if ok {
            Ok(())
        } else {
            Err(Refusal::WrongRole {
                protocol,
                local: Box::new(local.clone()),
                peer: Box::new(peer.clone()),
            })
        }
    };
    let same_site = || {
        if local.same_site(peer) {
            Ok(())
        } else {
            Err(Refusal::WrongSite {
                protocol,
                local: Box::new(local.clone()),
                peer: Box::new(peer.clone()),
            })
        }
    };
    let members = [Role::Node, Role::Relay];
    match protocol {
        Protocol::Gossip => {
            role(members.contains(&local.role) && members.contains(&peer.role))?;
            same_site()
        }
        // Any hub serves any relay (relays fail over across hubs); the hub
        // binds everything a relay sends to the site in its certificate.
        Protocol::Uplink => match side {
            Side::Server => role(local.role == Role::Hub && peer.role == Role::Relay),
            Side::Client => role(local.role == Role::Relay && peer.role == Role::Hub),
        },
        // Only hubs federate, across regions.
        Protocol::Federation | Protocol::Replication => {
            role(local.role == Role::Hub && peer.role == Role::Hub)
        }
        // A member fetches from its own site's relay only: the relay serves
        // what its site needs, and nobody else's.
        Protocol::Fetch => {
            match side {
                Side::Server => role(local.role == Role::Relay && members.contains(&peer.role))?,
                Side::Client => role(members.contains(&local.role) && peer.role == Role::Relay)?,
            }
            same_site()
        }
    }
}

/// How a client's region and site relate to the server's, in the
/// authorisation matrix of docs/SECURITY.md (for a hub, which has no site,
/// "same site" means the same region).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Relation {
    SameSite,
    OtherSite,
    OtherRegion,
}

/// The client columns of the matrix.
pub const MATRIX_CLIENTS: [(Role, Relation); 9] = [
    (Role::Node, Relation::SameSite),
    (Role::Node, Relation::OtherSite),
    (Role::Node, Relation::OtherRegion),
    (Role::Relay, Relation::SameSite),
    (Role::Relay, Relation::OtherSite),
    (Role::Relay, Relation::OtherRegion),
    (Role::Hub, Relation::SameSite),
    (Role::Hub, Relation::OtherRegion),
    (Role::Operator, Relation::OtherRegion),
];

/// The server roles of the matrix: every role that serves a protocol.
pub const MATRIX_SERVERS: [Role; 3] = [Role::Node, Role::Relay, Role::Hub];

/// What a server decides about one client, a cell of the matrix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cell {
    /// The connection goes on.
    Allowed,
    /// Refused: this role may not speak this protocol with this server.
    Role,
    /// Refused: the protocol stays inside one site.
    Site,
    /// The server does not offer the ALPN; the TLS handshake fails.
    NotServed,
}

impl Cell {
    pub fn as_str(self) -> &'static str {
        match self {
            Cell::Allowed => "allowed",
            Cell::Role => "role",
            Cell::Site => "site",
            Cell::NotServed => "-",
        }
    }
}

/// One row of the matrix: a protocol served (or not) by a role, and the
/// decision for each client of [`MATRIX_CLIENTS`].
#[derive(Debug, Clone)]
pub struct MatrixRow {
    pub protocol: Protocol,
    pub server: Role,
    pub cells: Vec<Cell>,
}

/// The identity the matrix gives a member of `role` standing in
/// `relation` to a server in region `eu`, site `par`.
pub fn matrix_identity(role: Role, relation: Relation, name: &str) -> Identity {
    let (region, site) = match relation {
        Relation::SameSite => ("eu", "par"),
        Relation::OtherSite => ("eu", "ber"),
        Relation::OtherRegion => ("us", "nyc"),
    };
    let (region, site) = match role {
        Role::Hub => (region, ""),
        Role::Operator => ("", ""),
        _ => (region, site),
    };
    Identity::new(role, region, site, name).expect("matrix identities are valid")
}

/// The whole matrix, from [`served_by`] and [`authorize`]: what every
/// server decides about every kind of client, for every protocol.
pub fn matrix() -> Vec<MatrixRow> {
    let mut rows = Vec::new();
    for protocol in [
        Protocol::Gossip,
        Protocol::Fetch,
        Protocol::Uplink,
        Protocol::Federation,
        Protocol::Replication,
    ] {
        for server_role in MATRIX_SERVERS {
            let server = matrix_identity(server_role, Relation::SameSite, "server");
            let cells = MATRIX_CLIENTS
                .iter()
                .map(|&(role, relation)| {
                    if !served_by(server_role).contains(&protocol) {
                        return Cell::NotServed;
                    }
                    let client = matrix_identity(role, relation, "client");
                    match authorize(protocol, Side::Server, &server, &client) {
                        Ok(()) => Cell::Allowed,
                        Err(Refusal::WrongRole { .. }) => Cell::Role,
                        Err(Refusal::WrongSite { .. }) => Cell::Site,
                        // `authorize` judges identities; revocation is
                        // checked before it, by certificate.
                        Err(Refusal::Revoked(_)) => unreachable!("authorize never revokes"),
                    }
                })
                .collect();
            rows.push(MatrixRow {
                protocol,
                server: server_role,
                cells,
            });
        }
    }
    rows
}

/// The line before the matrix in docs/SECURITY.md.
pub const MATRIX_BEGIN: &str = "<!-- authz-matrix: begin";

/// The matrix as the Markdown table docs/SECURITY.md holds.
pub fn matrix_markdown() -> String {
    let relation = |r: Relation, role: Role| match (r, role) {
        (Relation::SameSite, Role::Hub) => "same region",
        (Relation::SameSite, _) => "same site",
        (Relation::OtherSite, _) => "other site",
        (Relation::OtherRegion, _) => "other region",
    };
    let mut out = String::from("| protocol | server |");
    for &(role, r) in &MATRIX_CLIENTS {
        if role == Role::Operator {
            out.push_str(" operator |");
        } else {
            out.push_str(&format!(" {role}, {} |", relation(r, role)));
        }
    }
    out.push_str("\n|---|---|");
    out.push_str(&"---|".repeat(MATRIX_CLIENTS.len()));
    out.push('\n');
    for row in matrix() {
        out.push_str(&format!("| {} | {} |", row.protocol, row.server));
        for cell in row.cells {
            out.push_str(&format!(" {} |", cell.as_str()));
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(role: Role, region: &str, site: &str, name: &str) -> Identity {
        Identity::new(role, region, site, name).unwrap()
    }

    #[test]
    fn each_server_lets_peers_open_only_the_streams_its_protocols_use() {
        let node = PeerStreams::enough_for(served_by(Role::Node));
        assert_eq!(node, PeerStreams { bidi: 0, uni: 16 });
        let relay = PeerStreams::enough_for(served_by(Role::Relay));
        assert_eq!(relay, PeerStreams { bidi: 100, uni: 16 });
        let hub = PeerStreams::enough_for(served_by(Role::Hub));
        assert_eq!(hub, PeerStreams { bidi: 100, uni: 16 });
        assert_eq!(
            PeerStreams::enough_for(&[Protocol::Fetch]),
            PeerStreams { bidi: 100, uni: 0 }
        );
    }

    #[test]
    fn gossip_is_allowed_between_members_of_one_site() {
        let a = id(Role::Node, "eu", "par", "a");
        let b = id(Role::Node, "eu", "par", "b");
        let r = id(Role::Relay, "eu", "par", "r");
        for side in [Side::Server, Side::Client] {
            authorize(Protocol::Gossip, side, &a, &b).unwrap();
            authorize(Protocol::Gossip, side, &a, &r).unwrap();
            authorize(Protocol::Gossip, side, &r, &a).unwrap();
        }
    }

    #[test]
    fn gossip_across_sites_or_regions_is_refused() {
        let a = id(Role::Node, "eu", "par", "a");
        for other in [
            id(Role::Node, "eu", "ber", "b"),
            id(Role::Node, "us", "par", "c"),
            id(Role::Relay, "eu", "ber", "r"),
        ] {
            let err = authorize(Protocol::Gossip, Side::Server, &a, &other).unwrap_err();
            assert_eq!(err.kind(), "wrong_site");
        }
    }

    #[test]
    fn hubs_and_operators_do_not_join_site_gossip() {
        let a = id(Role::Node, "eu", "par", "a");
        for other in [
            id(Role::Hub, "eu", "", "h"),
            id(Role::Operator, "", "", "o"),
        ] {
            let err = authorize(Protocol::Gossip, Side::Server, &a, &other).unwrap_err();
            assert_eq!(err.kind(), "wrong_role");
        }
    }

    #[test]
    fn members_fetch_from_their_own_sites_relay_only() {
        let relay = id(Role::Relay, "eu", "par", "r");
        let node = id(Role::Node, "eu", "par", "n");
        authorize(Protocol::Fetch, Side::Server, &relay, &node).unwrap();
        authorize(Protocol::Fetch, Side::Client, &node, &relay).unwrap();
        // Another site's relay, a node acting as a server, a hub: refused.
        let elsewhere = id(Role::Relay, "eu", "ber", "r2");
        let err = authorize(Protocol::Fetch, Side::Client, &node, &elsewhere).unwrap_err();
        assert_eq!(err.kind(), "wrong_site");
        let other = id(Role::Node, "eu", "par", "m");
        let err = authorize(Protocol::Fetch, Side::Client, &node, &other).unwrap_err();
        assert_eq!(err.kind(), "wrong_role");
        let hub = id(Role::Hub, "eu", "", "h");
        let err = authorize(Protocol::Fetch, Side::Server, &relay, &hub).unwrap_err();
        assert_eq!(err.kind(), "wrong_role");
    }

    #[test]
    fn only_relays_uplink_and_only_to_hubs() {
        let hub = id(Role::Hub, "eu", "", "h");
        let relay = id(Role::Relay, "us", "nyc", "r");
        let node = id(Role::Node, "eu", "par", "n");
        authorize(Protocol::Uplink, Side::Server, &hub, &relay).unwrap();
        authorize(Protocol::Uplink, Side::Client, &relay, &hub).unwrap();
        assert!(authorize(Protocol::Uplink, Side::Server, &hub, &node).is_err());
        assert!(authorize(Protocol::Uplink, Side::Client, &relay, &node).is_err());
        assert!(authorize(Protocol::Uplink, Side::Server, &relay, &relay).is_err());
    }

    #[test]
    fn only_hubs_federate_and_replicate_with_each_other() {
        let a = id(Role::Hub, "eu", "", "a");
        let b = id(Role::Hub, "us", "", "b");
        let relay = id(Role::Relay, "eu", "par", "r");
        let op = id(Role::Operator, "", "", "o");
        for p in [Protocol::Federation, Protocol::Replication] {
            for side in [Side::Server, Side::Client] {
                authorize(p, side, &a, &b).unwrap();
                assert_eq!(
                    authorize(p, side, &a, &relay).unwrap_err().kind(),
                    "wrong_role"
                );
                assert!(authorize(p, side, &a, &op).is_err());
                assert!(authorize(p, side, &relay, &a).is_err());
            }
        }
    }

    #[test]
    fn the_documented_matrix_is_the_one_enforced() {
        let doc = include_str!("../../docs/SECURITY.md");
        let begin = doc.find(MATRIX_BEGIN).expect("the matrix's start marker");
        let table = &doc[begin..];
        let table = &table[table.find('\n').expect("a line") + 1..];
        let end = table
            .find("<!-- authz-matrix: end")
            .expect("the matrix's end marker");
        assert_eq!(
            &table[..end],
            matrix_markdown(),
            "docs/SECURITY.md's matrix is not what the code enforces; put this there:\n{}",
            matrix_markdown()
        );
        // Every protocol against every role that serves something.
        assert_eq!(matrix().len(), Protocol::ALL.len() * 3);
    }

    #[test]
    fn every_protocol_has_a_distinct_alpn_naming_its_version() {
        for p in Protocol::ALL {
            assert_eq!(Protocol::from_alpn(&p.alpn()), Some((p, PROTOCOL_VERSION)));
            assert_eq!(Protocol::from_alpn(&p.alpn_at(7)), Some((p, 7)));
            assert_eq!(
                p.alpns(&(1..=3)),
                vec![p.alpn_at(3), p.alpn_at(2), p.alpn_at(1)],
                "newest first"
            );
        }
        assert_eq!(Protocol::from_alpn(b"trellis-uplink"), None);
        assert_eq!(Protocol::from_alpn(b"trellis-nope/1"), None);
        assert_eq!(Protocol::from_alpn(b"trellis-uplink/x"), None);
    }
}

//! Who a mesh member is: its role and where it sits in the hierarchy.
//!
//! An [`Identity`] is carried in every member's certificate (see
//! [`crate::tls`]) and decides what the member may do (see [`crate::authz`]).
//! Names are restricted to a small, DNS-like alphabet so that they are safe
//! in file names, URLs, gossip keys and log lines without escaping.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Longest accepted name, region or site.
pub const MAX_NAME_LEN: usize = 63;

/// The tier a member belongs to, as stated by its certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// An agent on a managed machine; gossips inside its site.
    Node,
    /// The site's summariser and uplink to the hubs.
    Relay,
    /// A regional management server.
    Hub,
    /// A human or automation changing desired state.
    Operator,
}

impl Role {
    pub const ALL: [Role; 4] = [Role::Node, Role::Relay, Role::Hub, Role::Operator];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Node => "node",
            Role::Relay => "relay",
            Role::Hub => "hub",
            Role::Operator => "operator",
        }
    }

    /// Whether certificates of this role must name a region.
    pub fn needs_region(self) -> bool {
        matches!(self, Role::Node | Role::Relay | Role::Hub)
    }

    /// Whether certificates of this role must name a site.
    pub fn needs_site(self) -> bool {
        matches!(self, Role::Node | Role::Relay)
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = IdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Role::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| IdError::UnknownRole(s.to_owned()))
    }
}

/// A member's identity: role, place in the hierarchy and name.
///
/// `region` is empty for operators; `site` is empty for hubs and operators.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Identity {
    pub role: Role,
    pub region: String,
    pub site: String,
    pub name: String,
}

/// Why an identity or a name was rejected. Rejection has no side effects.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("unknown role {0:?}: expected one of node, relay, hub, operator")]
    UnknownRole(String),
    #[error(
        "invalid {what} {value:?}: use 1 to {MAX_NAME_LEN} characters from a-z, 0-9, '-', '_' \
         and '.', starting with a letter or digit"
    )]
    BadName { what: &'static str, value: String },
    #[error("a {role} certificate needs a {what} (--{what})")]
    Missing { role: Role, what: &'static str },
    #[error("a {role} certificate has no {what}; do not pass --{what}")]
    Unexpected { role: Role, what: &'static str },
    #[error("certificate identity {0:?} is not a trellis identity URI")]
    BadUri(String),
}

/// Checks that `value` is a valid name, region or site.
pub fn validate_name(what: &'static str, value: &str) -> Result<(), IdError> {
    let ok = !value.is_empty()
        && value.len() <= MAX_NAME_LEN
        && value
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.".contains(&b))
        && value
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    if ok {
        Ok(())
    } else {
        Err(IdError::BadName {
            what,
            value: value.to_owned(),
        })
    }
}

const URI_PREFIX: &str = "trellis://";

impl Identity {
    /// Builds an identity, checking that the role's required fields are
    /// present, forbidden ones absent and every field well-formed.
    pub fn new(
        role: Role,
        region: impl Into<String>,
        site: impl Into<String>,
        name: impl Into<String>,
    ) -> Result<Self, IdError> {
        let id = Identity {
            role,
            region: region.into(),
            site: site.into(),
            name: name.into(),
        };
        id.validate()?;
        Ok(id)
    }

    fn validate(&self) -> Result<(), IdError> {
        validate_name("name", &self.name)?;
        for (what, value, needed) in [
            ("region", &self.region, self.role.needs_region()),
            ("site", &self.site, self.role.needs_site()),
        ] {
            match (needed, value.is_empty()) {
                (true, true) => {
                    return Err(IdError::Missing {
                        role: self.role,
                        what,
                    });
                }
                (false, false) => {
                    return Err(IdError::Unexpected {
                        role: self.role,
                        what,
                    });
                }
                (true, false) => validate_name(what, value)?,
                (false, true) => {}
            }
        }
        Ok(())
    }

    /// The URI written into the certificate's subject alternative names:
    /// `trellis://ROLE/REGION/SITE/NAME`, with `-` for an absent field.
    pub fn to_uri(&self) -> String {
        let dash = |s: &str| {
            if s.is_empty() {
                "-".to_owned()
            } else {
                s.to_owned()
            }
        };
        format!(
            "{URI_PREFIX}{}/{}/{}/{}",
            self.role,
            dash(&self.region),
            dash(&self.site),
            self.name
        )
    }

    /// Parses [`Identity::to_uri`]'s output.
    pub fn from_uri(uri: &str) -> Result<Self, IdError> {
        let bad = || IdError::BadUri(uri.to_owned());
        let rest = uri.strip_prefix(URI_PREFIX).ok_or_else(bad)?;
        let parts: Vec<&str> = rest.split('/').collect();
        let [role, region, site, name] = parts[..] else {
            return Err(bad());
        };
        let undash = |s: &str| {
            if s == "-" {
                String::new()
            } else {
                s.to_owned()
            }
        };
        Identity::new(role.parse()?, undash(region), undash(site), name)
    }

    /// Same region and site (the relation gossip and uplinks are checked on).
    pub fn same_site(&self, other: &Identity) -> bool {
        !self.site.is_empty() && self.region == other.region && self.site == other.site
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.role, self.name)?;
        match (self.region.is_empty(), self.site.is_empty()) {
            (true, _) => Ok(()),
            (false, true) => write!(f, " (region {})", self.region),
            (false, false) => write!(f, " (site {}/{})", self.region, self.site),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_survives_its_uri() {
        for id in [
            Identity::new(Role::Node, "eu", "par-1", "n01").unwrap(),
            Identity::new(Role::Hub, "eu", "", "hub-a").unwrap(),
            Identity::new(Role::Operator, "", "", "alice").unwrap(),
        ] {
            assert_eq!(Identity::from_uri(&id.to_uri()).unwrap(), id);
        }
    }

    #[test]
    fn nodes_and_relays_need_a_site_and_hubs_refuse_one() {
        assert!(matches!(
            Identity::new(Role::Node, "eu", "", "n1"),
            Err(IdError::Missing { what: "site", .. })
        ));
        assert!(matches!(
            Identity::new(Role::Hub, "eu", "par", "h1"),
            Err(IdError::Unexpected { what: "site", .. })
        ));
        assert!(matches!(
            Identity::new(Role::Operator, "eu", "", "alice"),
            Err(IdError::Unexpected { what: "region", .. })
        ));
    }

    #[test]
    fn names_outside_the_alphabet_are_rejected() {
        for bad in ["", "-x", "A", "a b", "a/b", "é", &"x".repeat(64)] {
            assert!(validate_name("name", bad).is_err(), "{bad:?} accepted");
        }
        for good in ["a", "0", "n-01", "par_1.a"] {
            validate_name("name", good).unwrap();
        }
    }

    #[test]
    fn uris_of_other_shapes_are_rejected() {
        for bad in [
            "",
            "trellis://node/eu/par",
            "trellis://node/eu/par/n1/x",
            "spiffe://node/eu/par/n1",
            "trellis://king/eu/par/n1",
        ] {
            assert!(Identity::from_uri(bad).is_err(), "{bad:?} accepted");
        }
    }
}

//! Certificate revocation: entries signed by the mesh CA, and the set every
//! member enforces.
//!
//! `trellis ca revoke` signs one [`Revocation`] per certificate with the CA
//! key; a hub checks the signature and writes it into the replicated
//! desired state, hubs push the set to their relays, and each relay
//! publishes it to its site in gossip. Because every entry carries the CA's
//! signature, whoever carries it cannot forge or alter one: a member
//! believes an entry only after checking it against the CA certificate it
//! already trusts.
//!
//! A certificate is named by the SHA-256 of its DER ([`fingerprint`]), so
//! a certificate issued again to the same name after a revocation is a
//! different certificate and works.
//!
//! Three kinds:
//! - [`Kind::Revoked`]: the certificate is refused everywhere, for every
//!   connection (open ones are closed) and every signature.
//! - [`Kind::Decommissioned`]: refused like a revoked one, and the member
//!   has left the fleet on purpose (`trellis node decommission`): its relay
//!   drops it from the site's views instead of reporting it dead, and the
//!   member itself stops when it sees the entry.
//! - [`Kind::Retired`]: an operator signing key rotated out. Hubs refuse
//!   new desired state signed with it; what it signed before stays valid, so
//!   rotating a key does not mean signing history again.
//!
//! An entry is kept until the certificate it names expires; after that, TLS
//! refuses the certificate anyway and the entry is dropped.

use std::collections::HashMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

/// What a revocation does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// An operator signing key rotated out: no new desired state signed
    /// with it is accepted; history stays valid.
    Retired,
    /// The certificate is refused for every connection and signature.
    Revoked,
    /// Refused like [`Kind::Revoked`]; the member left the fleet on
    /// purpose and is no longer counted in it, alive or dead.
    Decommissioned,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Retired => "retired",
            Kind::Revoked => "revoked",
            Kind::Decommissioned => "decommissioned",
        }
    }

    /// Whether a certificate with an entry of this kind is refused for
    /// every connection and signature.
    pub fn refuses(self) -> bool {
        self != Kind::Retired
    }
}

/// One certificate's revocation, as the CA signs it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revocation {
    /// SHA-256 of the certificate's DER.
    pub fingerprint: [u8; 32],
    /// The identity the certificate carries (`trellis://…`), for people.
    pub identity: String,
    /// When the certificate expires (Unix seconds): the entry is dropped
    /// after that.
    pub not_after: i64,
    /// When it was revoked (Unix seconds).
    pub at: i64,
    pub kind: Kind,
    /// Why, in the operator's words.
    pub reason: String,
}

/// A [`Revocation`] and the CA's ECDSA P-256 signature over
/// [`SIGNING_CONTEXT`] followed by `entry`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedRevocation {
    /// The postcard encoding of the [`Revocation`].
    pub entry: Vec<u8>,
    pub signature: Vec<u8>,
}

/// Prefix of the bytes the CA signs, so that a revocation signature can
/// never be taken for any other signature of the CA key.
pub const SIGNING_CONTEXT: &[u8] = b"trellis revocation v1\0";

/// Largest encoded entry accepted (identity and reason are short).
pub const MAX_ENTRY_BYTES: usize = 1024;

/// Longest reason `trellis ca revoke` takes.
pub const MAX_REASON_CHARS: usize = 200;

/// Why a revocation was not believed. Nothing changes then.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RevocationError {
    #[error("revocation entry of {0} bytes (at most {MAX_ENTRY_BYTES})")]
    TooLarge(usize),
    #[error("revocation entry does not decode: {0}")]
    Decode(String),
    #[error("revocation not signed by this mesh's CA")]
    BadSignature,
    #[error("the CA certificate holds no usable key: {0}")]
    BadCa(String),
    #[error("revocation reason is {0} characters long (at most {MAX_REASON_CHARS})")]
    ReasonTooLong(usize),
}

/// The gossip key under which a relay publishes the revocation list to
/// its site ([`gossip_value`]).
pub const GOSSIP_KEY: &str = "revocations";

/// Most bytes of revocations one gossip value carries (before hex): a
/// chitchat message is at most 64 KiB, and one key's value must fit in
/// one. About 130 entries.
pub const MAX_GOSSIP_BYTES: usize = 24 * 1024;

/// The gossip value for `list` (hex of its postcard encoding), newest
/// revocations first, and how many entries did not fit in
/// [`MAX_GOSSIP_BYTES`] and were left out.
pub fn gossip_value(list: &[SignedRevocation]) -> (String, usize) {
    let mut by_age: Vec<(i64, &SignedRevocation)> = list
        .iter()
        .map(|s| (decode(&s.entry).map_or(0, |r| r.at), s))
        .collect();
    by_age.sort_by_key(|(at, _)| std::cmp::Reverse(*at));
    let mut kept: Vec<SignedRevocation> = Vec::new();
    let mut size = 0;
    for (_, s) in &by_age {
        let one = s.entry.len() + s.signature.len() + 4;
        if size + one > MAX_GOSSIP_BYTES {
            break;
        }
        size += one;
        kept.push((*s).clone());
    }
    let left_out = list.len() - kept.len();
    let bytes = postcard::to_allocvec(&kept).expect("revocations serialise");
    (crate::apply::hex(&bytes), left_out)
}

/// The list in a gossip value, signatures not yet checked.
pub fn from_gossip(value: &str) -> Result<Vec<SignedRevocation>, RevocationError> {
    if value.len() > 2 * MAX_GOSSIP_BYTES + 64 {
        return Err(RevocationError::TooLarge(value.len() / 2));
    }
    if !value.len().is_multiple_of(2) || !value.is_ascii() {
        return Err(RevocationError::Decode("not hex".into()));
    }
    let bytes = (0..value.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&value[i..i + 2], 16))
        .collect::<Result<Vec<u8>, _>>()
        .map_err(|_| RevocationError::Decode("not hex".into()))?;
    let (list, rest) = postcard::take_from_bytes::<Vec<SignedRevocation>>(&bytes)
        .map_err(|e| RevocationError::Decode(e.to_string()))?;
    if !rest.is_empty() {
        return Err(RevocationError::Decode(format!(
            "{} bytes after the list",
            rest.len()
        )));
    }
    Ok(list)
}

/// SHA-256 of a certificate's DER: how revocations name certificates.
pub fn fingerprint(cert_der: &[u8]) -> [u8; 32] {
    let digest = ring::digest::digest(&ring::digest::SHA256, cert_der);
    let mut out = [0; 32];
    out.copy_from_slice(digest.as_ref());
    out
}

/// The bytes the CA signs for `entry`.
pub fn signing_bytes(entry: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(SIGNING_CONTEXT.len() + entry.len());
    out.extend_from_slice(SIGNING_CONTEXT);
    out.extend_from_slice(entry);
    out
}

/// Checks `signed` against the CA certificate `ca_der` and decodes it.
pub fn verify(ca_der: &[u8], signed: &SignedRevocation) -> Result<Revocation, RevocationError> {
    if signed.entry.len() > MAX_ENTRY_BYTES {
        return Err(RevocationError::TooLarge(signed.entry.len()));
    }
    use x509_parser::prelude::*;
    let (_, ca) =
        X509Certificate::from_der(ca_der).map_err(|e| RevocationError::BadCa(e.to_string()))?;
    let key = &ca.tbs_certificate.subject_pki.subject_public_key.data;
    ring::signature::UnparsedPublicKey::new(&ring::signature::ECDSA_P256_SHA256_ASN1, key)
        .verify(&signing_bytes(&signed.entry), &signed.signature)
        .map_err(|_| RevocationError::BadSignature)?;
    decode(&signed.entry)
}

/// Decodes an entry's bytes (after its signature was checked).
pub fn decode(entry: &[u8]) -> Result<Revocation, RevocationError> {
    if entry.len() > MAX_ENTRY_BYTES {
        return Err(RevocationError::TooLarge(entry.len()));
    }
    let r: Revocation =
        postcard::from_bytes(entry).map_err(|e| RevocationError::Decode(e.to_string()))?;
    let chars = r.reason.chars().count();
    if chars > MAX_REASON_CHARS {
        return Err(RevocationError::ReasonTooLong(chars));
    }
    Ok(r)
}

/// The revocations a member enforces, by certificate fingerprint. Every
/// entry in it was checked against the CA.
#[derive(Debug, Clone, Default)]
pub struct RevocationSet {
    entries: HashMap<[u8; 32], (Revocation, SignedRevocation)>,
}

impl RevocationSet {
    /// The set of the entries in `signed` that the CA signed and that
    /// name a certificate still valid at `now` (Unix seconds); for one
    /// certificate, [`Kind::Decommissioned`] outranks [`Kind::Revoked`], which
    /// outranks [`Kind::Retired`]. Entries
    /// that fail their check are returned with the reason, and left out.
    pub fn verified<'a>(
        ca_der: &[u8],
        signed: impl IntoIterator<Item = &'a SignedRevocation>,
        now: i64,
    ) -> (Self, Vec<RevocationError>) {
        let mut set = RevocationSet::default();
        let mut errors = Vec::new();
        for s in signed {
            match verify(ca_der, s) {
                Ok(r) => set.insert(r, s.clone(), now),
                Err(e) => errors.push(e),
            }
        }
        (set, errors)
    }

    /// Adds an entry already checked against the CA, unless the
    /// certificate it names expired before `now`.
    pub fn insert(&mut self, r: Revocation, signed: SignedRevocation, now: i64) {
        if r.not_after < now {
            return;
        }
        let stronger = self
            .entries
            .get(&r.fingerprint)
            .is_none_or(|(have, _)| (r.kind, r.at) > (have.kind, have.at));
        if stronger {
            self.entries.insert(r.fingerprint, (r, signed));
        }
    }

    /// The entry for a certificate, of either kind.
    pub fn get(&self, fingerprint: &[u8; 32]) -> Option<&Revocation> {
        self.entries.get(fingerprint).map(|(r, _)| r)
    }

    /// The revocation that refuses this certificate everywhere, if any
    /// (revoked or decommissioned).
    pub fn revoked(&self, fingerprint: &[u8; 32]) -> Option<&Revocation> {
        self.get(fingerprint).filter(|r| r.kind.refuses())
    }

    /// The identities (`trellis://…`) of the decommissioned members.
    pub fn decommissioned(&self) -> impl Iterator<Item = &str> {
        self.entries
            .values()
            .filter(|(r, _)| r.kind == Kind::Decommissioned)
            .map(|(r, _)| r.identity.as_str())
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Every entry, oldest revocation first (then by fingerprint).
    pub fn entries(&self) -> Vec<&Revocation> {
        let mut all: Vec<&Revocation> = self.entries.values().map(|(r, _)| r).collect();
        all.sort_by_key(|r| (r.at, r.fingerprint));
        all
    }

    /// Every entry as signed, in the order of [`RevocationSet::entries`]:
    /// what a member passes on.
    pub fn signed(&self) -> Vec<SignedRevocation> {
        let mut all: Vec<&(Revocation, SignedRevocation)> = self.entries.values().collect();
        all.sort_by_key(|(r, _)| (r.at, r.fingerprint));
        all.into_iter().map(|(_, s)| s.clone()).collect()
    }

    /// A short digest of the set, equal on two members exactly when they
    /// hold the same entries: what a relay publishes to say which set it
    /// has, and what logs show.
    pub fn digest(&self) -> String {
        let mut fps: Vec<(&[u8; 32], Kind)> = self
            .entries
            .iter()
            .map(|(fp, (r, _))| (fp, r.kind))
            .collect();
        fps.sort();
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        for (fp, kind) in fps {
            ctx.update(fp);
            ctx.update(&[kind as u8]);
        }
        crate::apply::hex(&ctx.finish().as_ref()[..8])
    }
}

/// A member's current revocation set, shared by every part of the
/// process that checks certificates or signatures (every clone of its
/// [`crate::tls::Credentials`] holds the same one). Cheap to clone.
#[derive(Clone)]
pub struct Revocations {
    tx: Arc<watch::Sender<Arc<RevocationSet>>>,
}

impl Default for Revocations {
    fn default() -> Self {
        Revocations {
            tx: Arc::new(watch::Sender::new(Arc::new(RevocationSet::default()))),
        }
    }
}

impl std::fmt::Debug for Revocations {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Revocations({} entries)", self.current().len())
    }
}

impl Revocations {
    /// The set in force now.
    pub fn current(&self) -> Arc<RevocationSet> {
        self.tx.borrow().clone()
    }

    /// Replaces the set if it differs from the one in force (by
    /// [`RevocationSet::digest`]); returns whether it did. Whoever watches
    /// ([`Revocations::subscribe`]) is told.
    pub fn replace(&self, set: RevocationSet) -> bool {
        if set.digest() == self.current().digest() {
            return false;
        }
        self.tx.send_replace(Arc::new(set));
        true
    }

    /// A receiver told of each new set.
    pub fn subscribe(&self) -> watch::Receiver<Arc<RevocationSet>> {
        self.tx.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::MeshCa;

    fn entry(ca: &MeshCa, fp: u8, kind: Kind, not_after: i64) -> SignedRevocation {
        ca.sign_revocation(&Revocation {
            fingerprint: [fp; 32],
            identity: "trellis://node/eu/s1/n1".into(),
            not_after,
            at: 100,
            kind,
            reason: "lost laptop".into(),
        })
        .unwrap()
    }

    fn ca_der(ca: &MeshCa) -> Vec<u8> {
        use rustls::pki_types::CertificateDer;
        use rustls::pki_types::pem::PemObject;
        CertificateDer::from_pem_slice(ca.cert_pem().as_bytes())
            .unwrap()
            .to_vec()
    }

    #[test]
    fn an_entry_signed_by_the_ca_verifies_and_one_altered_or_from_another_ca_does_not() {
        let ca = MeshCa::generate("a").unwrap();
        let other = MeshCa::generate("b").unwrap();
        let s = entry(&ca, 1, Kind::Revoked, 1_000);
        let r = verify(&ca_der(&ca), &s).unwrap();
        assert_eq!(r.fingerprint, [1; 32]);
        assert_eq!(
            verify(&ca_der(&other), &s),
            Err(RevocationError::BadSignature)
        );
        let mut altered = s.clone();
        let last = altered.entry.len() - 1;
        altered.entry[last] ^= 1;
        assert_eq!(
            verify(&ca_der(&ca), &altered),
            Err(RevocationError::BadSignature)
        );
        let huge = SignedRevocation {
            entry: vec![0; MAX_ENTRY_BYTES + 1],
            signature: vec![],
        };
        assert!(matches!(
            verify(&ca_der(&ca), &huge),
            Err(RevocationError::TooLarge(_))
        ));
    }

    #[test]
    fn revoked_outranks_retired_and_expired_certificates_drop_out() {
        let ca = MeshCa::generate("a").unwrap();
        let signed = [
            entry(&ca, 1, Kind::Retired, 1_000),
            entry(&ca, 1, Kind::Revoked, 1_000),
            entry(&ca, 1, Kind::Retired, 1_000),
            entry(&ca, 2, Kind::Retired, 1_000),
            entry(&ca, 3, Kind::Revoked, 10),
        ];
        let (set, errors) = RevocationSet::verified(&ca_der(&ca), &signed, 500);
        assert!(errors.is_empty());
        assert_eq!(set.len(), 2, "the expired certificate's entry is dropped");
        assert!(set.revoked(&[1; 32]).is_some());
        assert!(set.revoked(&[2; 32]).is_none(), "retired is not revoked");
        assert_eq!(set.get(&[2; 32]).unwrap().kind, Kind::Retired);
        assert_eq!(set.signed().len(), 2);
        let (again, _) = RevocationSet::verified(&ca_der(&ca), &set.signed(), 500);
        assert_eq!(again.digest(), set.digest());
        assert_ne!(RevocationSet::default().digest(), set.digest());
    }

    #[test]
    fn a_decommissioned_certificate_is_refused_and_its_member_named() {
        let ca = MeshCa::generate("a").unwrap();
        let signed = [
            entry(&ca, 1, Kind::Decommissioned, 1_000),
            entry(&ca, 1, Kind::Revoked, 1_000),
            entry(&ca, 2, Kind::Revoked, 1_000),
        ];
        let (set, _) = RevocationSet::verified(&ca_der(&ca), &signed, 500);
        assert_eq!(set.get(&[1; 32]).unwrap().kind, Kind::Decommissioned);
        assert!(set.revoked(&[1; 32]).is_some(), "refused like revoked");
        assert_eq!(
            set.decommissioned().collect::<Vec<_>>(),
            ["trellis://node/eu/s1/n1"],
            "only the decommissioned entry names a member that left"
        );
    }

    #[test]
    fn a_list_goes_through_gossip_newest_first_and_within_its_size() {
        let ca = MeshCa::generate("a").unwrap();
        let one = |fp: u8, at: i64| {
            ca.sign_revocation(&Revocation {
                fingerprint: [fp; 32],
                identity: "trellis://node/eu/s1/n1".into(),
                not_after: i64::MAX,
                at,
                kind: Kind::Revoked,
                reason: "x".repeat(150),
            })
            .unwrap()
        };
        let few: Vec<SignedRevocation> = (0..3).map(|i| one(i, i64::from(i))).collect();
        let (value, left_out) = gossip_value(&few);
        assert_eq!(left_out, 0);
        let back = from_gossip(&value).unwrap();
        assert_eq!(back.len(), 3);
        assert_eq!(back[0], few[2], "newest first");
        let many: Vec<SignedRevocation> = (0..200).map(|i| one(i, i64::from(i))).collect();
        let (value, left_out) = gossip_value(&many);
        assert!(left_out > 0 && left_out < 200, "{left_out}");
        assert!(value.len() <= 2 * MAX_GOSSIP_BYTES + 8);
        let back = from_gossip(&value).unwrap();
        assert_eq!(back[0], many[199], "the newest are kept");
        assert!(from_gossip("zz").is_err());
        assert!(from_gossip("0").is_err());
        assert!(from_gossip(&format!("{value}00")).is_err());
    }

    #[test]
    fn the_shared_handle_tells_its_watchers_of_a_changed_set_only() {
        let ca = MeshCa::generate("a").unwrap();
        let handle = Revocations::default();
        let mut rx = handle.subscribe();
        rx.borrow_and_update();
        assert!(!handle.replace(RevocationSet::default()));
        assert!(!rx.has_changed().unwrap());
        let (set, _) =
            RevocationSet::verified(&ca_der(&ca), &[entry(&ca, 1, Kind::Revoked, 1_000)], 0);
        assert!(handle.replace(set.clone()));
        assert!(rx.has_changed().unwrap());
        assert!(handle.clone().current().revoked(&[1; 32]).is_some());
    }
}

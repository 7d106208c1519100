//! A fleet configuration version signed by an operator, as it travels from
//! the operator through hubs and relays to every node.
//!
//! Only the operator's Ed25519 signature makes a bundle trusted: hubs and
//! relays store and forward the bytes, and each node checks the signature
//! and the operator's certificate against the mesh CA before it resolves or
//! applies anything, so a compromised hub or relay cannot change a node's
//! files. The signature covers the exact postcard bytes that travel, so
//! nothing is re-encoded between signing and checking.

use serde::{Deserialize, Serialize};

use crate::desired::{Fleet, FleetError};
use crate::id::Identity;
use crate::signature::{SignatureError, check_operator_credentials, verify_operator_signature};
use crate::tls::{Credentials, KeyAlgorithm, TlsError};

/// Largest encoded bundle accepted, in bytes: the fleet's content limit
/// (`desired::MAX_FLEET_BYTES`) with room for manifests and encoding. A
/// bundle travels whole in one uplink frame (4 MiB) and one replication
/// entry; configuration is text, and large artefacts are not shipped this
/// way.
pub const MAX_BUNDLE_BYTES: usize = 3 << 20;

/// One version of the fleet's configuration and what describes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bundle {
    /// The configuration version; nodes apply only newer ones.
    pub version: u64,
    /// When the operator made it, Unix milliseconds.
    pub created_ms: u64,
    /// The operator's note about the change.
    pub comment: String,
    pub fleet: Fleet,
}

/// A [`Bundle`] as signed bytes, with the certificate of who signed it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedBundle {
    /// The postcard encoding of the [`Bundle`]; exactly what was signed.
    pub bundle: Vec<u8>,
    /// The operator's Ed25519 signature of `bundle`.
    pub signature: Vec<u8>,
    /// The operator's certificate (DER).
    pub operator_cert: Vec<u8>,
}

impl SignedBundle {
    /// SHA-256 of the bundle bytes: names a version independently of who
    /// signed it or how it is stored.
    pub fn digest(&self) -> [u8; 32] {
        let mut out = [0; 32];
        out.copy_from_slice(ring::digest::digest(&ring::digest::SHA256, &self.bundle).as_ref());
        out
    }
}

/// Why a bundle could not be signed or was refused. A refused bundle is not
/// used at all; nothing else changes.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    /// Signing was asked of credentials that are not an operator's.
    #[error("{0} is not an operator: only operator credentials sign configuration bundles")]
    NotOperatorCredentials(Identity),
    /// The operator's certificate holds a key of another kind (issued before
    /// operators had Ed25519 keys).
    #[error(
        "operator {identity} has an {algorithm} key; configuration bundles need an Ed25519 \
         operator key: issue a new certificate with `trellis ca issue --role operator`"
    )]
    NotEd25519 {
        identity: Identity,
        algorithm: KeyAlgorithm,
    },
    /// Our own key could not sign.
    #[error("signing the bundle failed: {0}")]
    Sign(TlsError),
    /// The bundle is over [`MAX_BUNDLE_BYTES`] encoded; not decoded.
    #[error("the bundle is {0} bytes, over the limit of {MAX_BUNDLE_BYTES}")]
    TooLarge(usize),
    /// The signer's certificate was not issued by this mesh's CA, has
    /// expired, or is not a Trellis certificate.
    #[error("bundle signed by an unknown key: {0}")]
    UnknownKey(TlsError),
    /// The certificate is the mesh's, but not an operator's.
    #[error("bundle signed by {0}, which is not an operator")]
    NotOperator(Identity),
    /// The signature does not match the bundle bytes (altered in transit or
    /// signed by another key).
    #[error("bad signature on the bundle from {0}: it was altered or not signed by this operator")]
    BadSignature(Identity),
    /// The signer's certificate is revoked, or (for new desired state at
    /// a hub) its key was retired by a rotation.
    #[error(transparent)]
    SignerRevoked(SignatureError),
    /// Correctly signed, but the bytes are not a bundle, or its fleet breaks
    /// the rules `Fleet::load` enforces.
    #[error("bundle from {signer} is malformed: {reason}")]
    Malformed { signer: Identity, reason: String },
}

/// The shared operator checks, worded for configuration bundles.
fn from_signature(e: SignatureError) -> BundleError {
    match e {
        SignatureError::NotOperatorCredentials(id) => BundleError::NotOperatorCredentials(id),
        SignatureError::NotEd25519 {
            identity,
            algorithm,
        } => BundleError::NotEd25519 {
            identity,
            algorithm,
        },
        SignatureError::UnknownKey(e) => BundleError::UnknownKey(e),
        SignatureError::NotOperator(id) => BundleError::NotOperator(id),
        SignatureError::BadSignature(id) => BundleError::BadSignature(id),
        e @ (SignatureError::Revoked(_) | SignatureError::Retired(_)) => {
            BundleError::SignerRevoked(e)
        }
    }
}

/// Signs `bundle` with an operator's Ed25519 key.
pub fn sign(operator: &Credentials, bundle: &Bundle) -> Result<SignedBundle, BundleError> {
    check_operator_credentials(operator).map_err(from_signature)?;
    let bytes = postcard::to_stdvec(bundle).map_err(|e| {
        // Encoding plain structs into a Vec cannot fail short of memory.
        BundleError::Sign(TlsError::Config(format!("encoding the bundle: {e}")))
    })?;
    if bytes.len() > MAX_BUNDLE_BYTES {
        return Err(BundleError::TooLarge(bytes.len()));
    }
    let signature = operator.sign(&bytes).map_err(BundleError::Sign)?;
    Ok(SignedBundle {
        bundle: bytes,
        signature,
        operator_cert: operator.cert_der().to_vec(),
    })
}

/// Checks a signed bundle against the mesh CA in `trust` and decodes it:
/// the certificate is the mesh's and an operator's with an Ed25519 key, the
/// signature covers exactly the bundle bytes, and the bundle decodes to a
/// valid fleet. Returns the bundle and who signed it.
pub fn verify(
    trust: &Credentials,
    signed: &SignedBundle,
) -> Result<(Bundle, Identity), BundleError> {
    if signed.bundle.len() > MAX_BUNDLE_BYTES {
        return Err(BundleError::TooLarge(signed.bundle.len()));
    }
    let identity = verify_operator_signature(
        trust,
        &signed.operator_cert,
        &signed.bundle,
        &signed.signature,
    )
    .map_err(from_signature)?;
    let bundle = decode(&signed.bundle).map_err(|reason| BundleError::Malformed {
        signer: identity.clone(),
        reason,
    })?;
    Ok((bundle, identity))
}

/// Decodes a bundle's signed bytes, as [`verify`] does once the signature
/// holds: exactly one bundle, nothing after it, and a valid fleet.
pub fn decode(bytes: &[u8]) -> Result<Bundle, String> {
    let (bundle, rest) =
        postcard::take_from_bytes::<Bundle>(bytes).map_err(|e| format!("not a bundle: {e}"))?;
    if !rest.is_empty() {
        return Err(format!("{} bytes after the bundle", rest.len()));
    }
    bundle
        .fleet
        .validate()
        .map_err(|e: FleetError| e.to_string())?;
    Ok(bundle)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::desired::{FileSpec, Manifest, Selector};
    use crate::id::Role;
    use crate::tls::MeshCa;
    use proptest::prelude::*;

    fn fleet() -> Fleet {
        Fleet::from_manifests(vec![Manifest {
            name: "base.toml".into(),
            vars: vec![],
            files: vec![FileSpec {
                path: "/etc/motd".into(),
                content: b"hello {{node.name}}\n".to_vec(),
                source: None,
                mode: 0o644,
                reload: vec![],
                selector: Selector::all(),
                template: true,
            }],
        }])
        .unwrap()
    }

    fn bundle() -> Bundle {
        Bundle {
            version: 7,
            created_ms: 1_700_000_000_000,
            comment: "motd".into(),
            fleet: fleet(),
        }
    }

    struct Mesh {
        alice: Credentials,
        node: Credentials,
        hub: Credentials,
    }

    fn mesh(ca: &MeshCa) -> Mesh {
        let issue = |role, region: &str, site: &str, name: &str| {
            Credentials::issue(ca, &Identity::new(role, region, site, name).unwrap()).unwrap()
        };
        Mesh {
            alice: issue(Role::Operator, "", "", "alice"),
            node: issue(Role::Node, "eu", "par", "n1"),
            hub: issue(Role::Hub, "eu", "", "h1"),
        }
    }

    #[test]
    fn a_bundle_signed_by_an_operator_verifies_and_round_trips() {
        let ca = MeshCa::generate("test").unwrap();
        let m = mesh(&ca);
        let signed = sign(&m.alice, &bundle()).unwrap();
        assert_eq!(signed.signature.len(), 64);
        // As it would travel: encoded, then decoded on the node.
        let wire = postcard::to_stdvec(&signed).unwrap();
        let received: SignedBundle = postcard::from_bytes(&wire).unwrap();
        let (back, who) = verify(&m.node, &received).unwrap();
        assert_eq!(back, bundle());
        assert_eq!(who, m.alice.identity);
        assert_eq!(received.digest(), signed.digest());
        assert_eq!(
            signed.digest().to_vec(),
            ring::digest::digest(&ring::digest::SHA256, &signed.bundle)
                .as_ref()
                .to_vec()
        );
    }

    #[test]
    fn altered_bundle_bytes_are_a_bad_signature() {
        let ca = MeshCa::generate("test").unwrap();
        let m = mesh(&ca);
        let signed = sign(&m.alice, &bundle()).unwrap();
        let mut altered = signed.clone();
        let last = altered.bundle.len() - 1;
        altered.bundle[last] ^= 1;
        assert!(matches!(
            verify(&m.node, &altered),
            Err(BundleError::BadSignature(id)) if id.name == "alice"
        ));
        let mut longer = signed.clone();
        longer.bundle.push(0);
        assert!(matches!(
            verify(&m.node, &longer),
            Err(BundleError::BadSignature(_))
        ));
        let mut resigned = signed;
        resigned.signature[0] ^= 1;
        assert!(matches!(
            verify(&m.node, &resigned),
            Err(BundleError::BadSignature(_))
        ));
    }

    #[test]
    fn a_bundle_from_an_operator_of_another_ca_is_an_unknown_key() {
        let ours = MeshCa::generate("ours").unwrap();
        let theirs = MeshCa::generate("theirs").unwrap();
        let signed = sign(&mesh(&theirs).alice, &bundle()).unwrap();
        let err = verify(&mesh(&ours).node, &signed).unwrap_err();
        assert!(matches!(err, BundleError::UnknownKey(_)), "{err}");
        assert!(err.to_string().contains("mesh CA"), "{err}");
    }

    #[test]
    fn only_operators_sign_and_a_hub_signature_is_refused() {
        let ca = MeshCa::generate("test").unwrap();
        let m = mesh(&ca);
        assert!(matches!(
            sign(&m.hub, &bundle()),
            Err(BundleError::NotOperatorCredentials(id)) if id.name == "h1"
        ));
        // A hub forging the whole envelope with its own key.
        let bytes = postcard::to_stdvec(&bundle()).unwrap();
        let forged = SignedBundle {
            signature: m.hub.sign(&bytes).unwrap(),
            bundle: bytes,
            operator_cert: m.hub.cert_der().to_vec(),
        };
        assert!(matches!(
            verify(&m.node, &forged),
            Err(BundleError::NotOperator(id)) if id.role == Role::Hub
        ));
        // A hub's signature under the operator's certificate.
        let stolen_cert = SignedBundle {
            operator_cert: m.alice.cert_der().to_vec(),
            ..forged
        };
        assert!(matches!(
            verify(&m.node, &stolen_cert),
            Err(BundleError::BadSignature(_))
        ));
    }

    #[test]
    fn correctly_signed_bytes_that_are_no_bundle_are_malformed() {
        let ca = MeshCa::generate("test").unwrap();
        let m = mesh(&ca);
        let junk = vec![0xff; 40];
        let signed = SignedBundle {
            signature: m.alice.sign(&junk).unwrap(),
            bundle: junk,
            operator_cert: m.alice.cert_der().to_vec(),
        };
        assert!(matches!(
            verify(&m.node, &signed),
            Err(BundleError::Malformed { .. })
        ));
        // A valid encoding followed by extra bytes, signed as a whole.
        let mut bytes = postcard::to_stdvec(&bundle()).unwrap();
        bytes.push(0);
        let signed = SignedBundle {
            signature: m.alice.sign(&bytes).unwrap(),
            bundle: bytes,
            operator_cert: m.alice.cert_der().to_vec(),
        };
        let err = verify(&m.node, &signed).unwrap_err();
        assert!(matches!(err, BundleError::Malformed { .. }), "{err}");
        // A fleet the loader would have refused (a relative path).
        let mut bad = bundle();
        let mut manifest = bad.fleet.manifests()[0].clone();
        manifest.files[0].path = "etc/motd".into();
        // A fleet's encoding is that of its manifests; decoding is how a
        // fleet that skipped validation reaches a node.
        let bad_fleet: Fleet =
            postcard::from_bytes(&postcard::to_stdvec(&vec![manifest]).unwrap()).unwrap();
        bad.fleet = bad_fleet;
        let signed = sign(&m.alice, &bad).unwrap();
        let err = verify(&m.node, &signed).unwrap_err();
        assert!(
            matches!(&err, BundleError::Malformed { reason, .. } if reason.contains("etc/motd")),
            "{err}"
        );
    }

    #[test]
    fn an_oversized_bundle_is_refused_before_anything_else() {
        let ca = MeshCa::generate("test").unwrap();
        let m = mesh(&ca);
        let signed = SignedBundle {
            bundle: vec![0; MAX_BUNDLE_BYTES + 1],
            signature: vec![],
            operator_cert: vec![],
        };
        assert!(matches!(
            verify(&m.node, &signed),
            Err(BundleError::TooLarge(n)) if n == MAX_BUNDLE_BYTES + 1
        ));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn garbage_bundles_and_signatures_are_refused_without_panicking(
            bundle in proptest::collection::vec(any::<u8>(), 0..512),
            signature in proptest::collection::vec(any::<u8>(), 0..128),
            use_real_cert in any::<bool>(),
        ) {
            let alice = shared_operator();
            let cert = if use_real_cert { alice.cert_der().to_vec() } else { bundle.clone() };
            let signed = SignedBundle { bundle, signature, operator_cert: cert };
            prop_assert!(verify(alice, &signed).is_err());
        }
    }

    /// One operator for all proptest cases (issuing is slow).
    fn shared_operator() -> &'static Credentials {
        static ALICE: std::sync::OnceLock<Credentials> = std::sync::OnceLock::new();
        ALICE.get_or_init(|| mesh(&MeshCa::generate("test").unwrap()).alice)
    }
}

//! The operator-signature rules that every piece of signed desired state
//! follows, whatever it carries (configuration bundles, patches).
//!
//! Only an operator's Ed25519 signature over the exact bytes that travel
//! makes desired state trusted; hubs and relays only store and forward it.
//! Keeping the checks in one place means a configuration bundle and a patch
//! can never drift apart in what they accept. Each caller turns a
//! [`SignatureError`] into its own error, worded for what was signed.

use crate::id::{Identity, Role};
use crate::tls::{Credentials, KeyAlgorithm, TlsError};

/// Why operator credentials cannot sign, or a signature was refused.
/// Nothing is signed or accepted then; nothing else changes.
#[derive(Debug, thiserror::Error)]
pub enum SignatureError {
    /// Signing was asked of credentials that are not an operator's.
    #[error("{0} is not an operator: only operator credentials sign desired state")]
    NotOperatorCredentials(Identity),
    /// The certificate holds a key of another kind than Ed25519 (issued
    /// before operators had Ed25519 keys).
    #[error(
        "operator {identity} has an {algorithm} key; desired state needs an Ed25519 operator \
         key: issue a new certificate with `trellis ca issue --role operator`"
    )]
    NotEd25519 {
        identity: Identity,
        algorithm: KeyAlgorithm,
    },
    /// The signer's certificate was not issued by this mesh's CA, has
    /// expired, or is not a Trellis certificate.
    #[error("signed by an unknown key: {0}")]
    UnknownKey(TlsError),
    /// The certificate is the mesh's, but not an operator's.
    #[error("signed by {0}, which is not an operator")]
    NotOperator(Identity),
    /// The signature does not match the bytes (altered in transit or
    /// signed by another key).
    #[error("bad signature from {0}: the bytes were altered or not signed by this operator")]
    BadSignature(Identity),
    /// The signer's certificate is revoked (`trellis ca revoke`).
    #[error("signed by {0}, whose certificate is revoked")]
    Revoked(Identity),
    /// The signer's key was rotated out (`trellis ca rotate`): what it
    /// signed before stays valid, nothing new is taken.
    #[error(
        "signed by {0} with a retired key: sign with the operator's current certificate \
         (`trellis ca rotate` issued it)"
    )]
    Retired(Identity),
}

/// Checks that `operator` may sign desired state: an operator's
/// credentials with an Ed25519 key.
pub fn check_operator_credentials(operator: &Credentials) -> Result<(), SignatureError> {
    if operator.identity.role != Role::Operator {
        return Err(SignatureError::NotOperatorCredentials(
            operator.identity.clone(),
        ));
    }
    if operator.algorithm() != KeyAlgorithm::Ed25519 {
        return Err(SignatureError::NotEd25519 {
            identity: operator.identity.clone(),
            algorithm: operator.algorithm(),
        });
    }
    Ok(())
}

/// Checks `signature` over exactly `bytes` by the holder of `cert`: the
/// certificate is from the mesh CA in `trust`, an operator's, with an
/// Ed25519 key, and the signature matches. Returns who signed.
///
/// A certificate on the member's revocation list as revoked is refused;
/// one retired by a key rotation is accepted, since what it signed before
/// the rotation stays valid ([`check_current_key`] is for desired
/// state entering the mesh).
///
/// Callers check their size limit before this, so that an oversized
/// message costs no certificate parsing, and decode `bytes` only after it.
pub fn verify_operator_signature(
    trust: &Credentials,
    cert: &[u8],
    bytes: &[u8],
    signature: &[u8],
) -> Result<Identity, SignatureError> {
    let identity = verify_ignoring_revocation(trust, cert, bytes, signature)?;
    let fp = crate::revocation::fingerprint(cert);
    if trust.revocations().current().revoked(&fp).is_some() {
        return Err(SignatureError::Revoked(identity));
    }
    Ok(identity)
}

/// For desired state a hub is asked to accept now, after
/// [`verify_operator_signature`]: refuses a certificate whose key was
/// retired by a rotation.
pub fn check_current_key(
    trust: &Credentials,
    cert: &[u8],
    signer: &Identity,
) -> Result<(), SignatureError> {
    let fp = crate::revocation::fingerprint(cert);
    if trust.revocations().current().get(&fp).is_some() {
        return Err(SignatureError::Retired(signer.clone()));
    }
    Ok(())
}

fn verify_ignoring_revocation(
    trust: &Credentials,
    cert: &[u8],
    bytes: &[u8],
    signature: &[u8],
) -> Result<Identity, SignatureError> {
    let signer = trust
        .verify_signer(cert)
        .map_err(SignatureError::UnknownKey)?;
    let identity = signer.identity.clone();
    if identity.role != Role::Operator {
        return Err(SignatureError::NotOperator(identity));
    }
    if signer.algorithm() != KeyAlgorithm::Ed25519 {
        return Err(SignatureError::NotEd25519 {
            identity,
            algorithm: signer.algorithm(),
        });
    }
    if signer.verify(bytes, signature).is_err() {
        return Err(SignatureError::BadSignature(identity));
    }
    Ok(identity)
}

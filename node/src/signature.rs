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
/// Callers check their size limit before this, so that an oversized
/// message costs no certificate parsing, and decode `bytes` only after it.
pub fn verify_operator_signature(
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

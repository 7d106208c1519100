//! The mesh CA, member certificates and the rustls/quinn configurations
//! built from them.
//!
//! Every certificate carries its [`Identity`] as a URI subject alternative
//! name (`trellis://ROLE/REGION/SITE/NAME`) and the fixed DNS name
//! [`MESH_SERVER_NAME`]. TLS verifies the chain against the mesh CA (so a
//! certificate from another CA fails the handshake); what a verified peer may
//! then do is decided from its identity by [`crate::authz`]. Peers are reached
//! by address, not by name, which is why the DNS name is the same for all.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use time::OffsetDateTime;

use crate::id::{IdError, Identity};

/// The DNS name in every member certificate and the server name every
/// client asks for.
pub const MESH_SERVER_NAME: &str = "trellis-mesh";

/// Default lifetime of an issued member certificate.
pub const DEFAULT_CERT_DAYS: u32 = 365;

/// Lifetime of a mesh CA.
pub const CA_DAYS: u32 = 3650;

/// Why credentials could not be created, loaded or used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} already exists; refusing to overwrite it (remove it first)")]
    Exists { path: PathBuf },
    #[error("{path}: no mesh CA here; create one with `trellis ca init --dir {dir}`")]
    NoCa { path: PathBuf, dir: PathBuf },
    #[error("{path}: not a PEM certificate or key: {reason}")]
    BadPem { path: PathBuf, reason: String },
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("certificate is not a trellis member certificate: {0}")]
    NotTrellis(String),
    #[error(transparent)]
    Identity(#[from] IdError),
    #[error("TLS configuration: {0}")]
    Config(String),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> TlsError + '_ {
    move |source| TlsError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Installs ring as the process-wide rustls provider (for HTTP clients that
/// build their own configs). Idempotent.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A mesh certificate authority: its certificate and signing key.
pub struct MeshCa {
    cert_pem: String,
    key: KeyPair,
}

/// File names inside a CA directory.
pub const CA_CERT_FILE: &str = "ca.crt";
pub const CA_KEY_FILE: &str = "ca.key";

impl MeshCa {
    /// Generates a new CA named `name` (the subject's common name).
    pub fn generate(name: &str) -> Result<Self, TlsError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, format!("{name} (trellis mesh CA)"));
        dn.push(DnType::OrganizationName, "trellis");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::hours(1);
        params.not_after = now + time::Duration::days(CA_DAYS.into());
        let cert = params.self_signed(&key)?;
        Ok(MeshCa {
            cert_pem: cert.pem(),
            key,
        })
    }

    /// Writes `ca.crt` and `ca.key` (mode 0600) into `dir`, refusing to
    /// overwrite an existing CA.
    pub fn save(&self, dir: &Path) -> Result<(), TlsError> {
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        write_new(&dir.join(CA_CERT_FILE), self.cert_pem.as_bytes(), false)?;
        write_new(
            &dir.join(CA_KEY_FILE),
            self.key.serialize_pem().as_bytes(),
            true,
        )
    }

    /// Loads the CA kept in `dir`.
    pub fn load(dir: &Path) -> Result<Self, TlsError> {
        let cert_path = dir.join(CA_CERT_FILE);
        let key_path = dir.join(CA_KEY_FILE);
        if !cert_path.exists() {
            return Err(TlsError::NoCa {
                path: cert_path,
                dir: dir.to_owned(),
            });
        }
        let cert_pem = fs::read_to_string(&cert_path).map_err(io_err(&cert_path))?;
        let key_pem = fs::read_to_string(&key_path).map_err(io_err(&key_path))?;
        let key = KeyPair::from_pem(&key_pem).map_err(|e| TlsError::BadPem {
            path: key_path,
            reason: e.to_string(),
        })?;
        Ok(MeshCa { cert_pem, key })
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// Issues a member certificate for `identity`, valid for `days`.
    pub fn issue(&self, identity: &Identity, days: u32) -> Result<IssuedCert, TlsError> {
        let issuer = Issuer::from_ca_cert_pem(&self.cert_pem, &self.key)?;
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(vec![MESH_SERVER_NAME.to_owned()])?;
        params
            .subject_alt_names
            .push(SanType::URI(identity.to_uri().try_into()?));
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, identity.name.clone());
        dn.push(DnType::OrganizationName, "trellis");
        dn.push(DnType::OrganizationalUnitName, identity.role.as_str());
        params.distinguished_name = dn;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        let now = OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::hours(1);
        params.not_after = now + time::Duration::days(days.into());
        let cert = params.signed_by(&key, &issuer)?;
        Ok(IssuedCert {
            identity: identity.clone(),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

/// A freshly issued member certificate and its private key.
pub struct IssuedCert {
    pub identity: Identity,
    pub cert_pem: String,
    pub key_pem: String,
}

impl IssuedCert {
    /// Writes `NAME.crt` and `NAME.key` (mode 0600) into `dir` and returns
    /// their paths. Refuses to overwrite unless `force`.
    pub fn save(&self, dir: &Path, force: bool) -> Result<(PathBuf, PathBuf), TlsError> {
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        let cert = dir.join(format!("{}.crt", self.identity.name));
        let key = dir.join(format!("{}.key", self.identity.name));
        for path in [&cert, &key] {
            if !force && path.exists() {
                return Err(TlsError::Exists { path: path.clone() });
            }
        }
        write_file(&cert, self.cert_pem.as_bytes(), false)?;
        write_file(&key, self.key_pem.as_bytes(), true)?;
        Ok((cert, key))
    }
}

fn write_new(path: &Path, bytes: &[u8], secret: bool) -> Result<(), TlsError> {
    if path.exists() {
        return Err(TlsError::Exists {
            path: path.to_owned(),
        });
    }
    write_file(path, bytes, secret)
}

/// Writes a file atomically (temp file, fsync, rename), 0600 for secrets.
fn write_file(path: &Path, bytes: &[u8], secret: bool) -> Result<(), TlsError> {
    let tmp = path.with_extension("tmp");
    let mut opts = fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(if secret { 0o600 } else { 0o644 });
    }
    let mut f = opts.open(&tmp).map_err(io_err(&tmp))?;
    f.write_all(bytes).map_err(io_err(&tmp))?;
    f.sync_all().map_err(io_err(&tmp))?;
    fs::rename(&tmp, path).map_err(io_err(path))
}

/// Everything a member needs to speak mutual TLS in the mesh.
#[derive(Clone, Debug)]
pub struct Credentials {
    pub identity: Identity,
    ca: CertificateDer<'static>,
    chain: Vec<CertificateDer<'static>>,
    key: Arc<PrivateKeyDer<'static>>,
}

impl Credentials {
    /// Loads a CA certificate, a member certificate and its key from PEM files.
    pub fn load(ca: &Path, cert: &Path, key: &Path) -> Result<Self, TlsError> {
        let read = |p: &Path| fs::read(p).map_err(io_err(p));
        Self::from_pem_with_paths(&read(ca)?, ca, &read(cert)?, cert, &read(key)?, key)
    }

    /// Builds credentials from PEM text held in memory.
    pub fn from_pem(ca: &str, cert: &str, key: &str) -> Result<Self, TlsError> {
        let mem = Path::new("<memory>");
        Self::from_pem_with_paths(
            ca.as_bytes(),
            mem,
            cert.as_bytes(),
            mem,
            key.as_bytes(),
            mem,
        )
    }

    fn from_pem_with_paths(
        ca: &[u8],
        ca_path: &Path,
        cert: &[u8],
        cert_path: &Path,
        key: &[u8],
        key_path: &Path,
    ) -> Result<Self, TlsError> {
        let bad = |path: &Path, e: rustls::pki_types::pem::Error| TlsError::BadPem {
            path: path.to_owned(),
            reason: e.to_string(),
        };
        let ca = CertificateDer::from_pem_slice(ca).map_err(|e| bad(ca_path, e))?;
        let chain = CertificateDer::pem_slice_iter(cert)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| bad(cert_path, e))?;
        let key = PrivateKeyDer::from_pem_slice(key).map_err(|e| bad(key_path, e))?;
        let leaf = chain.first().ok_or_else(|| TlsError::BadPem {
            path: cert_path.to_owned(),
            reason: "no certificate in file".into(),
        })?;
        let identity = identity_of(leaf)?;
        Ok(Credentials {
            identity,
            ca,
            chain,
            key: Arc::new(key),
        })
    }

    /// Credentials for `identity`, freshly issued by `ca` (used by
    /// `trellis up` and tests, which keep everything in memory).
    pub fn issue(ca: &MeshCa, identity: &Identity) -> Result<Self, TlsError> {
        let issued = ca.issue(identity, DEFAULT_CERT_DAYS)?;
        Self::from_pem(ca.cert_pem(), &issued.cert_pem, &issued.key_pem)
    }

    fn roots(&self) -> Result<Arc<rustls::RootCertStore>, TlsError> {
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(self.ca.clone())
            .map_err(|e| TlsError::Config(format!("CA certificate: {e}")))?;
        Ok(Arc::new(roots))
    }

    /// A quinn server configuration accepting the given ALPN protocols from
    /// clients holding a certificate of the mesh CA.
    pub fn server_config(
        &self,
        alpns: &[&[u8]],
        transport: Arc<quinn::TransportConfig>,
    ) -> Result<quinn::ServerConfig, TlsError> {
        let verifier =
            rustls::server::WebPkiClientVerifier::builder_with_provider(self.roots()?, provider())
                .build()
                .map_err(|e| TlsError::Config(e.to_string()))?;
        let mut tls = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.chain.clone(), self.key.clone_key())
            .map_err(|e| TlsError::Config(e.to_string()))?;
        tls.alpn_protocols = alpns.iter().map(|a| a.to_vec()).collect();
        let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
            .map_err(|e| TlsError::Config(e.to_string()))?;
        let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        config.transport_config(transport);
        Ok(config)
    }

    /// A quinn client configuration for one ALPN protocol, presenting our
    /// certificate and trusting only the mesh CA.
    pub fn client_config(
        &self,
        alpn: &[u8],
        transport: Arc<quinn::TransportConfig>,
    ) -> Result<quinn::ClientConfig, TlsError> {
        let mut tls = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_root_certificates(self.roots()?)
            .with_client_auth_cert(self.chain.clone(), self.key.clone_key())
            .map_err(|e| TlsError::Config(e.to_string()))?;
        tls.alpn_protocols = vec![alpn.to_vec()];
        let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
            .map_err(|e| TlsError::Config(e.to_string()))?;
        let mut config = quinn::ClientConfig::new(Arc::new(crypto));
        config.transport_config(transport);
        Ok(config)
    }
}

impl Credentials {
    /// This member's certificate (DER).
    pub fn cert_der(&self) -> &[u8] {
        &self.chain[0]
    }

    /// Signs `msg` with this member's key (ECDSA P-256, SHA-256, ASN.1), so
    /// that any member holding the mesh CA can tell who wrote it.
    pub fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, TlsError> {
        let PrivateKeyDer::Pkcs8(pkcs8) = &*self.key else {
            return Err(TlsError::Config("signing needs a PKCS#8 key".into()));
        };
        let rng = ring::rand::SystemRandom::new();
        let key = ring::signature::EcdsaKeyPair::from_pkcs8(
            &ring::signature::ECDSA_P256_SHA256_ASN1_SIGNING,
            pkcs8.secret_pkcs8_der(),
            &rng,
        )
        .map_err(|e| TlsError::Config(format!("not an ECDSA P-256 key: {e}")))?;
        key.sign(&rng, msg)
            .map(|s| s.as_ref().to_vec())
            .map_err(|e| TlsError::Config(format!("signing failed: {e}")))
    }

    /// Checks that `cert` was issued by the mesh CA (and is valid now) and
    /// that `signature` over `msg` was made with its key. Returns the
    /// signer's identity.
    pub fn verify_signed(
        &self,
        cert: &[u8],
        msg: &[u8],
        signature: &[u8],
    ) -> Result<Identity, TlsError> {
        let signer = self.verify_signer(cert)?;
        signer.verify(msg, signature)?;
        Ok(signer.identity)
    }

    /// Checks that `cert` was issued by the mesh CA, once, so that many
    /// messages signed with it can then be checked with
    /// [`Signer::verify`] alone (a management log holds thousands of
    /// entries per origin, each with the same certificate).
    pub fn verify_signer(&self, cert: &[u8]) -> Result<Signer, TlsError> {
        let der = CertificateDer::from(cert.to_vec());
        let verifier =
            rustls::server::WebPkiClientVerifier::builder_with_provider(self.roots()?, provider())
                .build()
                .map_err(|e| TlsError::Config(e.to_string()))?;
        verifier
            .verify_client_cert(&der, &[], rustls::pki_types::UnixTime::now())
            .map_err(|e| TlsError::NotTrellis(format!("certificate not from the mesh CA: {e}")))?;
        let identity = identity_of(&der)?;
        use x509_parser::prelude::*;
        let (_, x509) =
            X509Certificate::from_der(cert).map_err(|e| TlsError::NotTrellis(e.to_string()))?;
        let key = x509
            .tbs_certificate
            .subject_pki
            .subject_public_key
            .data
            .to_vec();
        Ok(Signer { identity, key })
    }
}

/// A certificate checked against the mesh CA, and the key it certifies.
#[derive(Debug, Clone)]
pub struct Signer {
    pub identity: Identity,
    key: Vec<u8>,
}

impl Signer {
    /// Checks `signature` of `msg` by this certificate's key.
    pub fn verify(&self, msg: &[u8], signature: &[u8]) -> Result<(), TlsError> {
        ring::signature::UnparsedPublicKey::new(&ring::signature::ECDSA_P256_SHA256_ASN1, &self.key)
            .verify(msg, signature)
            .map_err(|_| TlsError::NotTrellis(format!("bad signature by {}", self.identity)))
    }
}

/// Reads the trellis identity out of a certificate.
pub fn identity_of(cert: &CertificateDer<'_>) -> Result<Identity, TlsError> {
    use x509_parser::prelude::*;
    let (_, x509) =
        X509Certificate::from_der(cert).map_err(|e| TlsError::NotTrellis(e.to_string()))?;
    let san = x509
        .subject_alternative_name()
        .map_err(|e| TlsError::NotTrellis(e.to_string()))?
        .ok_or_else(|| TlsError::NotTrellis("no subject alternative names".into()))?;
    let uri = san
        .value
        .general_names
        .iter()
        .find_map(|n| match n {
            GeneralName::URI(u) if u.starts_with("trellis://") => Some(*u),
            _ => None,
        })
        .ok_or_else(|| TlsError::NotTrellis("no trellis:// identity URI".into()))?;
    Ok(Identity::from_uri(uri)?)
}

/// The verified identity of the peer of an established connection.
pub fn peer_identity(conn: &quinn::Connection) -> Result<Identity, TlsError> {
    let any = conn
        .peer_identity()
        .ok_or_else(|| TlsError::NotTrellis("peer presented no certificate".into()))?;
    let chain = any
        .downcast::<Vec<CertificateDer<'static>>>()
        .map_err(|_| TlsError::NotTrellis("unexpected peer identity type".into()))?;
    let leaf = chain
        .first()
        .ok_or_else(|| TlsError::NotTrellis("empty certificate chain".into()))?;
    identity_of(leaf)
}

/// When a certificate stops being valid, in seconds since the Unix epoch.
pub fn not_after(cert_pem: &str) -> Result<i64, TlsError> {
    use x509_parser::prelude::*;
    let der =
        CertificateDer::from_pem_slice(cert_pem.as_bytes()).map_err(|e| TlsError::BadPem {
            path: "<memory>".into(),
            reason: e.to_string(),
        })?;
    let (_, x509) =
        X509Certificate::from_der(&der).map_err(|e| TlsError::NotTrellis(e.to_string()))?;
    Ok(x509.validity().not_after.timestamp())
}

/// Transport settings shared by all mesh connections: an idle timeout long
/// enough to keep gossip connections between rounds, no keep-alive by
/// default (protocols that need one set it on their client config).
pub fn transport_config(keep_alive: Option<Duration>) -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.max_idle_timeout(Some(
        quinn::IdleTimeout::try_from(Duration::from_secs(60)).expect("60 s fits"),
    ));
    t.keep_alive_interval(keep_alive);
    Arc::new(t)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::id::Role;

    #[test]
    fn issued_certificates_carry_their_identity() {
        let ca = MeshCa::generate("test").unwrap();
        let id = Identity::new(Role::Relay, "eu", "par", "r1").unwrap();
        let creds = Credentials::issue(&ca, &id).unwrap();
        assert_eq!(creds.identity, id);
        assert_eq!(identity_of(&creds.chain[0]).unwrap(), id);
    }

    #[test]
    fn a_ca_saved_to_disk_loads_back_and_is_not_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let ca = MeshCa::generate("test").unwrap();
        ca.save(dir.path()).unwrap();
        assert!(matches!(ca.save(dir.path()), Err(TlsError::Exists { .. })));
        let back = MeshCa::load(dir.path()).unwrap();
        assert_eq!(back.cert_pem(), ca.cert_pem());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(dir.path().join(CA_KEY_FILE))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }

    #[test]
    fn loading_from_an_empty_directory_says_how_to_create_a_ca() {
        let dir = tempfile::tempdir().unwrap();
        let err = MeshCa::load(dir.path()).err().unwrap().to_string();
        assert!(err.contains("trellis ca init"), "{err}");
    }

    #[test]
    fn a_signature_verifies_for_its_signer_and_nothing_else() {
        let ca = MeshCa::generate("test").unwrap();
        let hub =
            Credentials::issue(&ca, &Identity::new(Role::Hub, "eu", "", "h1").unwrap()).unwrap();
        let other =
            Credentials::issue(&ca, &Identity::new(Role::Hub, "eu", "", "h2").unwrap()).unwrap();
        let sig = hub.sign(b"entry").unwrap();
        let who = other.verify_signed(hub.cert_der(), b"entry", &sig).unwrap();
        assert_eq!(who.name, "h1");
        assert!(
            other.verify_signed(hub.cert_der(), b"entrx", &sig).is_err(),
            "altered message"
        );
        assert!(
            other
                .verify_signed(other.cert_der(), b"entry", &sig)
                .is_err(),
            "wrong signer"
        );
        let foreign = MeshCa::generate("foreign").unwrap();
        let impostor =
            Credentials::issue(&foreign, &Identity::new(Role::Hub, "eu", "", "h1").unwrap())
                .unwrap();
        let sig = impostor.sign(b"entry").unwrap();
        let err = other
            .verify_signed(impostor.cert_der(), b"entry", &sig)
            .unwrap_err();
        assert!(err.to_string().contains("mesh CA"), "{err}");
    }

    #[test]
    fn garbage_pem_is_a_clear_error() {
        let err = Credentials::from_pem("nope", "nope", "nope").unwrap_err();
        assert!(matches!(err, TlsError::BadPem { .. }), "{err}");
    }
}

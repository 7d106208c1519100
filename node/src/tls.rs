//! The mesh CA, member certificates and the rustls/quinn configurations
//! built from them.
//!
//! Every certificate carries its [`Identity`] as a URI subject alternative
//! name (`trellis://ROLE/REGION/SITE/NAME`) and the fixed DNS name
//! [`MESH_SERVER_NAME`]. TLS verifies the chain against the mesh CA (so a
//! certificate from another CA fails the handshake); what a verified peer may
//! then do is decided from its identity by [`crate::authz`]. Peers are reached
//! by address, not by name, which is why the DNS name is the same for all.

use std::fmt;
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

use crate::authz::PeerStreams;
use crate::id::{IdError, Identity, Role};

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
    /// A file could not be read or written; nothing was changed beyond it.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A certificate or key file is already there and was left alone.
    #[error("{path} already exists; refusing to overwrite it (remove it first)")]
    Exists { path: PathBuf },
    /// The directory holds no mesh CA.
    #[error("{path}: no mesh CA here; create one with `trellis ca init --dir {dir}`")]
    NoCa { path: PathBuf, dir: PathBuf },
    /// A file is not the PEM it should be.
    #[error("{path}: not a PEM certificate or key: {reason}")]
    BadPem { path: PathBuf, reason: String },
    /// rcgen could not make a key or certificate.
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    /// A certificate is not one the mesh CA issued to a member (or a
    /// signature by it does not verify).
    #[error("certificate is not a trellis member certificate: {0}")]
    NotTrellis(String),
    /// A certificate certifies a key Trellis cannot sign or verify with.
    #[error(
        "certificate key is {0}; Trellis signs with ECDSA P-256 (members) or Ed25519 \
         (operators): issue a new certificate with `trellis ca issue`"
    )]
    UnsupportedKey(String),
    /// The identity in a certificate is not a valid Trellis identity.
    #[error(transparent)]
    Identity(#[from] IdError),
    /// rustls refused the configuration, or a key could not be used.
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

    /// Issues a member certificate for `identity`, valid for `days`, with a
    /// fresh key of the kind its role signs with ([`KeyAlgorithm::for_role`]).
    /// The certificate itself is signed by the CA's P-256 key whatever the role.
    pub fn issue(&self, identity: &Identity, days: u32) -> Result<IssuedCert, TlsError> {
        let issuer = Issuer::from_ca_cert_pem(&self.cert_pem, &self.key)?;
        let key = KeyPair::generate_for(KeyAlgorithm::for_role(identity.role).rcgen())?;
        let params = member_params(identity, days)?;
        let cert = params.signed_by(&key, &issuer)?;
        Ok(IssuedCert {
            identity: identity.clone(),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// Signs a member certificate for `identity`, valid for `days`, over
    /// the public key of a certificate signing request (DER) made by the
    /// member itself, whose key never leaves it. Only the key is taken from
    /// the request: names, lifetime and usages are the CA's, as
    /// [`MeshCa::issue`] sets them. The key must be of the kind the role
    /// signs with. Returns the certificate (PEM).
    pub fn sign_request(
        &self,
        csr_der: &[u8],
        identity: &Identity,
        days: u32,
    ) -> Result<String, TlsError> {
        let der = rustls::pki_types::CertificateSigningRequestDer::from(csr_der);
        let mut csr = rcgen::CertificateSigningRequestParams::from_der(&der)?;
        let want = KeyAlgorithm::for_role(identity.role).rcgen();
        if rcgen::PublicKeyData::algorithm(&csr.public_key) != want {
            return Err(TlsError::Config(format!(
                "the request's key is not of the kind a {} signs with ({want:?})",
                identity.role
            )));
        }
        csr.params = member_params(identity, days)?;
        let issuer = Issuer::from_ca_cert_pem(&self.cert_pem, &self.key)?;
        Ok(csr.signed_by(&issuer)?.pem())
    }
}

/// A new key for a member of `role` and a certificate signing request over
/// it naming `name`: what a machine sends to enrol. Returns the key (PEM)
/// and the request (DER).
pub fn signing_request(role: Role, name: &str) -> Result<(String, Vec<u8>), TlsError> {
    let key = KeyPair::generate_for(KeyAlgorithm::for_role(role).rcgen())?;
    let mut params = CertificateParams::new(vec![MESH_SERVER_NAME.to_owned()])?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    params.distinguished_name = dn;
    let csr = params.serialize_request(&key)?;
    Ok((key.serialize_pem(), csr.der().to_vec()))
}

/// What every member certificate says: the identity as a URI SAN, the mesh
/// server name, the usages, and `days` of validity from an hour ago.
fn member_params(identity: &Identity, days: u32) -> Result<CertificateParams, TlsError> {
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
    Ok(params)
}

/// The CA directory's record of the certificates it issued, one JSON
/// object a line ([`IssuedRecord`]): what `trellis ca revoke NAME` finds
/// certificates by.
pub const ISSUED_FILE: &str = "issued.jsonl";

/// One certificate the CA issued.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct IssuedRecord {
    /// `trellis://ROLE/REGION/SITE/NAME`.
    pub identity: String,
    /// SHA-256 of the certificate's DER, hex.
    pub fingerprint: String,
    /// Unix seconds.
    pub issued_at: i64,
    pub not_after: i64,
}

impl IssuedRecord {
    /// The record of a certificate (PEM).
    pub fn of(identity: &Identity, cert_pem: &str) -> Result<Self, TlsError> {
        let der =
            CertificateDer::from_pem_slice(cert_pem.as_bytes()).map_err(|e| TlsError::BadPem {
                path: "<memory>".into(),
                reason: e.to_string(),
            })?;
        Ok(IssuedRecord {
            identity: identity.to_uri(),
            fingerprint: crate::apply::hex(&crate::revocation::fingerprint(&der)),
            issued_at: OffsetDateTime::now_utc().unix_timestamp(),
            not_after: not_after(cert_pem)?,
        })
    }

    /// Appends this record to the CA directory's [`ISSUED_FILE`] (and
    /// syncs it).
    pub fn append(&self, dir: &Path) -> Result<(), TlsError> {
        let path = dir.join(ISSUED_FILE);
        let mut line = serde_json::to_string(self).expect("records serialise");
        line.push('\n');
        let mut f = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(io_err(&path))?;
        f.write_all(line.as_bytes()).map_err(io_err(&path))?;
        f.sync_all().map_err(io_err(&path))
    }

    /// Every record in the CA directory's [`ISSUED_FILE`], oldest first
    /// (none if the file does not exist: certificates issued before the
    /// CA kept it).
    pub fn load_all(dir: &Path) -> Result<Vec<Self>, TlsError> {
        let path = dir.join(ISSUED_FILE);
        let text = match fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_err(&path)(e)),
        };
        text.lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
            .map(|(i, l)| {
                serde_json::from_str(l).map_err(|e| TlsError::BadPem {
                    path: path.clone(),
                    reason: format!("line {}: {e}", i + 1),
                })
            })
            .collect()
    }
}

impl MeshCa {
    /// Signs a revocation with the CA key (ECDSA P-256, over
    /// [`crate::revocation::SIGNING_CONTEXT`] and the entry's bytes).
    pub fn sign_revocation(
        &self,
        r: &crate::revocation::Revocation,
    ) -> Result<crate::revocation::SignedRevocation, TlsError> {
        let entry = postcard::to_allocvec(r).map_err(|e| TlsError::Config(e.to_string()))?;
        let rng = ring::rand::SystemRandom::new();
        let key = ring::signature::EcdsaKeyPair::from_pkcs8(
            &ring::signature::ECDSA_P256_SHA256_ASN1_SIGNING,
            &self.key.serialize_der(),
            &rng,
        )
        .map_err(|e| TlsError::Config(format!("the CA key is not an ECDSA P-256 key: {e}")))?;
        let signature = key
            .sign(&rng, &crate::revocation::signing_bytes(&entry))
            .map_err(|e| TlsError::Config(format!("signing failed: {e}")))?
            .as_ref()
            .to_vec();
        Ok(crate::revocation::SignedRevocation { entry, signature })
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
    /// The kind of key the member certificate certifies (and `key` is).
    algorithm: KeyAlgorithm,
    ca: CertificateDer<'static>,
    chain: Vec<CertificateDer<'static>>,
    key: Arc<PrivateKeyDer<'static>>,
    /// The revocations this member enforces, shared by every clone.
    revocations: crate::revocation::Revocations,
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
        let algorithm = key_algorithm_of(leaf)?;
        Ok(Credentials {
            identity,
            algorithm,
            ca,
            chain,
            key: Arc::new(key),
            revocations: Default::default(),
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
        alpns: &[Vec<u8>],
        transport: Arc<quinn::TransportConfig>,
    ) -> Result<quinn::ServerConfig, TlsError> {
        self.quic_server(false, alpns, transport)
    }

    /// A quinn server configuration presenting this member's certificate,
    /// verifying clients' against the mesh CA (and, if `optional`, also
    /// taking clients that present none).
    fn quic_server(
        &self,
        optional: bool,
        alpns: &[Vec<u8>],
        transport: Arc<quinn::TransportConfig>,
    ) -> Result<quinn::ServerConfig, TlsError> {
        let tls = self.tls_server(optional, alpns)?;
        let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
            .map_err(|e| TlsError::Config(e.to_string()))?;
        let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        config.transport_config(transport);
        Ok(config)
    }

    /// The TLS 1.3 server side of [`Credentials::server_config`] on its
    /// own, for a transport other than QUIC (the artifact benchmark's TLS
    /// over TCP row).
    pub fn tls_server_config(&self, alpns: &[Vec<u8>]) -> Result<rustls::ServerConfig, TlsError> {
        self.tls_server(false, alpns)
    }

    fn tls_server(
        &self,
        optional: bool,
        alpns: &[Vec<u8>],
    ) -> Result<rustls::ServerConfig, TlsError> {
        let mut verifier =
            rustls::server::WebPkiClientVerifier::builder_with_provider(self.roots()?, provider());
        if optional {
            verifier = verifier.allow_unauthenticated();
        }
        let verifier = verifier
            .build()
            .map_err(|e| TlsError::Config(e.to_string()))?;
        let mut tls = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.chain.clone(), self.key.clone_key())
            .map_err(|e| TlsError::Config(e.to_string()))?;
        tls.alpn_protocols = alpns.to_vec();
        no_resumption_server(&mut tls);
        Ok(tls)
    }

    /// A quinn client configuration offering `alpns` (one protocol, at the
    /// versions the member speaks, newest first), presenting our
    /// certificate and trusting only the mesh CA.
    pub fn client_config(
        &self,
        alpns: &[Vec<u8>],
        transport: Arc<quinn::TransportConfig>,
    ) -> Result<quinn::ClientConfig, TlsError> {
        let tls = self.tls_client_config(alpns)?;
        let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
            .map_err(|e| TlsError::Config(e.to_string()))?;
        let mut config = quinn::ClientConfig::new(Arc::new(crypto));
        config.transport_config(transport);
        Ok(config)
    }

    /// The TLS 1.3 client side of [`Credentials::client_config`] on its
    /// own, for a transport other than QUIC (the artifact benchmark's TLS
    /// over TCP row). It names the server [`MESH_SERVER_NAME`].
    pub fn tls_client_config(&self, alpns: &[Vec<u8>]) -> Result<rustls::ClientConfig, TlsError> {
        let mut tls = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_root_certificates(self.roots()?)
            .with_client_auth_cert(self.chain.clone(), self.key.clone_key())
            .map_err(|e| TlsError::Config(e.to_string()))?;
        tls.alpn_protocols = alpns.to_vec();
        tls.resumption = rustls::client::Resumption::disabled();
        Ok(tls)
    }
}

impl Credentials {
    /// A quinn server configuration for enrolment: a client may present no
    /// certificate (a machine has none yet), or one of the mesh CA (a
    /// member renewing its own), so it serves only the enrolment protocol,
    /// on an endpoint of its own.
    pub fn enrolment_server_config(
        &self,
        alpn: &[u8],
        transport: Arc<quinn::TransportConfig>,
    ) -> Result<quinn::ServerConfig, TlsError> {
        self.quic_server(true, &[alpn.to_vec()], transport)
    }
}

/// A quinn client configuration for a machine that has only the mesh CA's
/// certificate (`ca_pem`): it trusts servers of that CA and presents no
/// certificate.
pub fn enrolment_client_config(
    ca_pem: &[u8],
    alpn: &[u8],
) -> Result<quinn::ClientConfig, TlsError> {
    let ca = CertificateDer::from_pem_slice(ca_pem)
        .map_err(|e| TlsError::Config(format!("the CA certificate: {e}")))?;
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(ca)
        .map_err(|e| TlsError::Config(format!("CA certificate: {e}")))?;
    let mut tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![alpn.to_vec()];
    tls.resumption = rustls::client::Resumption::disabled();
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    Ok(quinn::ClientConfig::new(Arc::new(crypto)))
}

impl Credentials {
    /// This member's certificate (DER).
    pub fn cert_der(&self) -> &[u8] {
        &self.chain[0]
    }

    /// The mesh CA's certificate (DER).
    pub fn ca_der(&self) -> &[u8] {
        &self.ca
    }

    /// The revocations this member enforces: one set shared by every
    /// clone of these credentials, so that replacing it reaches the
    /// endpoint, the signature checks and every other holder at once.
    pub fn revocations(&self) -> &crate::revocation::Revocations {
        &self.revocations
    }

    /// The kind of key this member signs with.
    pub fn algorithm(&self) -> KeyAlgorithm {
        self.algorithm
    }

    /// Signs `msg` with this member's key (ECDSA P-256 with SHA-256, ASN.1,
    /// or Ed25519 for operators), so that any member holding the mesh CA can
    /// tell who wrote it.
    pub fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, TlsError> {
        let PrivateKeyDer::Pkcs8(pkcs8) = &*self.key else {
            return Err(TlsError::Config("signing needs a PKCS#8 key".into()));
        };
        let der = pkcs8.secret_pkcs8_der();
        match self.algorithm {
            KeyAlgorithm::EcdsaP256 => {
                let rng = ring::rand::SystemRandom::new();
                let key = ring::signature::EcdsaKeyPair::from_pkcs8(
                    &ring::signature::ECDSA_P256_SHA256_ASN1_SIGNING,
                    der,
                    &rng,
                )
                .map_err(|e| TlsError::Config(format!("not an ECDSA P-256 key: {e}")))?;
                key.sign(&rng, msg)
                    .map(|s| s.as_ref().to_vec())
                    .map_err(|e| TlsError::Config(format!("signing failed: {e}")))
            }
            KeyAlgorithm::Ed25519 => {
                // `maybe_unchecked` also takes PKCS#8 v1 keys (no embedded
                // public key), as other tools write them.
                let key = ring::signature::Ed25519KeyPair::from_pkcs8_maybe_unchecked(der)
                    .map_err(|e| TlsError::Config(format!("not an Ed25519 key: {e}")))?;
                Ok(key.sign(msg).as_ref().to_vec())
            }
        }
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
        let algorithm = key_algorithm_of(&der)?;
        use x509_parser::prelude::*;
        let (_, x509) =
            X509Certificate::from_der(cert).map_err(|e| TlsError::NotTrellis(e.to_string()))?;
        let key = x509
            .tbs_certificate
            .subject_pki
            .subject_public_key
            .data
            .to_vec();
        Ok(Signer {
            identity,
            algorithm,
            key,
        })
    }
}

/// The kinds of key a member certificate may certify, which decide how its
/// signatures are made and checked.
///
/// Operators sign desired state that every node verifies before applying it;
/// Ed25519 keeps those signatures small, deterministic (no per-signature
/// randomness to get wrong) and fast to check on small machines. The other
/// roles keep ECDSA P-256, which the management log's existing signatures use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KeyAlgorithm {
    /// ECDSA on P-256 with SHA-256, signatures ASN.1 encoded.
    EcdsaP256,
    /// Ed25519 (RFC 8032), 64-byte signatures.
    Ed25519,
}

impl KeyAlgorithm {
    /// The kind of key `ca issue` creates for a role.
    pub fn for_role(role: Role) -> Self {
        match role {
            Role::Operator => KeyAlgorithm::Ed25519,
            Role::Node | Role::Relay | Role::Hub => KeyAlgorithm::EcdsaP256,
        }
    }

    fn rcgen(self) -> &'static rcgen::SignatureAlgorithm {
        match self {
            KeyAlgorithm::EcdsaP256 => &rcgen::PKCS_ECDSA_P256_SHA256,
            KeyAlgorithm::Ed25519 => &rcgen::PKCS_ED25519,
        }
    }

    fn verification(self) -> &'static dyn ring::signature::VerificationAlgorithm {
        match self {
            KeyAlgorithm::EcdsaP256 => &ring::signature::ECDSA_P256_SHA256_ASN1,
            KeyAlgorithm::Ed25519 => &ring::signature::ED25519,
        }
    }
}

impl fmt::Display for KeyAlgorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            KeyAlgorithm::EcdsaP256 => "ECDSA P-256",
            KeyAlgorithm::Ed25519 => "Ed25519",
        })
    }
}

/// The kind of key a certificate certifies, from its SubjectPublicKeyInfo
/// algorithm (and, for EC keys, the named curve).
pub fn key_algorithm_of(cert: &[u8]) -> Result<KeyAlgorithm, TlsError> {
    use x509_parser::oid_registry::{OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_SIG_ED25519};
    use x509_parser::prelude::*;
    let (_, x509) =
        X509Certificate::from_der(cert).map_err(|e| TlsError::NotTrellis(e.to_string()))?;
    let alg = &x509.tbs_certificate.subject_pki.algorithm;
    if alg.algorithm == OID_SIG_ED25519 {
        return Ok(KeyAlgorithm::Ed25519);
    }
    if alg.algorithm == OID_KEY_TYPE_EC_PUBLIC_KEY {
        let curve = alg.parameters.as_ref().and_then(|p| p.as_oid().ok());
        return match curve {
            Some(c) if c == OID_EC_P256 => Ok(KeyAlgorithm::EcdsaP256),
            Some(c) => Err(TlsError::UnsupportedKey(format!("an EC key on curve {c}"))),
            None => Err(TlsError::UnsupportedKey(
                "an EC key without a named curve".into(),
            )),
        };
    }
    Err(TlsError::UnsupportedKey(format!(
        "of algorithm {}",
        alg.algorithm
    )))
}

/// A certificate checked against the mesh CA, and the key it certifies.
#[derive(Debug, Clone)]
pub struct Signer {
    pub identity: Identity,
    algorithm: KeyAlgorithm,
    key: Vec<u8>,
}

impl Signer {
    /// The kind of key the certificate certifies; [`Signer::verify`] checks
    /// signatures with this algorithm only.
    pub fn algorithm(&self) -> KeyAlgorithm {
        self.algorithm
    }

    /// Checks `signature` of `msg` by this certificate's key, with the
    /// algorithm of that key (a signature of another kind never verifies).
    pub fn verify(&self, msg: &[u8], signature: &[u8]) -> Result<(), TlsError> {
        ring::signature::UnparsedPublicKey::new(self.algorithm.verification(), &self.key)
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

/// The identity a certificate in PEM carries (not checked against the CA).
pub fn identity_of_pem(cert_pem: &str) -> Result<Identity, TlsError> {
    let der =
        CertificateDer::from_pem_slice(cert_pem.as_bytes()).map_err(|e| TlsError::BadPem {
            path: "<memory>".into(),
            reason: e.to_string(),
        })?;
    identity_of(&der)
}

/// The verified identity of the peer of an established connection.
pub fn peer_identity(conn: &quinn::Connection) -> Result<Identity, TlsError> {
    peer_certificate(conn).map(|(identity, _)| identity)
}

/// The verified identity of the peer of an established connection, and
/// its certificate's fingerprint ([`crate::revocation::fingerprint`]).
pub fn peer_certificate(conn: &quinn::Connection) -> Result<(Identity, [u8; 32]), TlsError> {
    let any = conn
        .peer_identity()
        .ok_or_else(|| TlsError::NotTrellis("peer presented no certificate".into()))?;
    let chain = any
        .downcast::<Vec<CertificateDer<'static>>>()
        .map_err(|_| TlsError::NotTrellis("unexpected peer identity type".into()))?;
    let leaf = chain
        .first()
        .ok_or_else(|| TlsError::NotTrellis("empty certificate chain".into()))?;
    Ok((identity_of(leaf)?, crate::revocation::fingerprint(leaf)))
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

/// Turns TLS session resumption off on a server: it sends no tickets and
/// keeps no sessions. Every member's certificate names the same server
/// ([`MESH_SERVER_NAME`]), so the ticket a client offered was most likely
/// another peer's, which cannot resume; what resumption did
/// was add bytes to handshakes and keep up to 256 sessions, each holding
/// the peer's certificate chain, in every configuration. Clients set
/// `Resumption::disabled()`. Every connection therefore presents and
/// verifies a full certificate chain.
fn no_resumption_server(tls: &mut rustls::ServerConfig) {
    tls.send_tls13_tickets = 0;
    tls.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
}

/// Idle timeout of mesh connections.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Idle timeout of gossip connections. A member of a 100-member site
/// exchanges with any one peer about every 24 s, at random (16 s at a
/// 1 s interval, when with 60 s one connection in forty idled out between
/// two exchanges and its next digest started again from full member ids;
/// see `gossip_codec`).
pub const GOSSIP_IDLE_TIMEOUT: Duration = Duration::from_secs(300);

/// The largest UDP payload, in bytes, a mesh endpoint sends or accepts;
/// QUIC's path MTU discovery searches up to it from 1,200.
///
/// Quinn hands the kernel up to ten datagrams of the path's size at once
/// (one `sendmsg` with UDP segmentation offload), and the kernel refuses a
/// batch over 65,507 bytes with `EMSGSIZE`, which quinn takes for a lost
/// MTU probe and drops silently. Ten times this is 65,000, so every batch
/// fits. With quinn's default bound (1,452 bytes, an Ethernet path) a relay
/// serving a 100 MiB artifact to ten nodes over loopback spent 3.3 to 3.7 s
/// of CPU on the gigabyte; with this one, 2.05 to 2.3 s (`bench-artifact`,
/// docs/BENCHMARKS.md, "Datagrams as large as the path takes"). At 8,952
/// (jumbo frames) the batches no longer fit, packets were lost and quinn's
/// black-hole detector fell back to 1,200 bytes; at 6,550 (65,500 a batch)
/// the nodes' sockets overflowed, 90 to 2,843 datagrams a run, and at
/// 6,500 none did. An Ethernet path still settles at its 1,452 bytes.
/// Only connections that move bulk data search this far
/// ([`crate::authz::Protocol::carries_bulk`]); the others stop at
/// [`ETHERNET_UDP_PAYLOAD`].
pub const MAX_UDP_PAYLOAD: u16 = 6_500;

/// The largest UDP payload of an Ethernet path (1,500 bytes less the IPv6
/// and UDP headers), quinn's own bound for path MTU discovery: the bound of
/// connections that exchange small messages.
pub const ETHERNET_UDP_PAYLOAD: u16 = 1_452;

/// Transport settings of mesh connections: an idle timeout and, for
/// protocols that need one, a keep-alive. A connection idles out after
/// the shorter of its two ends' timeouts, so a server offers the longest
/// ([`GOSSIP_IDLE_TIMEOUT`]) and each client config sets its protocol's.
/// Datagrams stop at an Ethernet path's, as on the mesh's uplinks.
pub fn transport_config(
    keep_alive: Option<Duration>,
    idle: Duration,
) -> Arc<quinn::TransportConfig> {
    transport_config_with_streams(
        keep_alive,
        idle,
        PeerStreams::QUINN_DEFAULT,
        ETHERNET_UDP_PAYLOAD,
    )
}

/// [`transport_config`] letting a peer keep at most `streams` open toward
/// us on a connection (see [`PeerStreams`]), and sending datagrams of up
/// to `largest_payload` bytes where the path takes them (QUIC's path MTU
/// discovery searches up to it; see [`MAX_UDP_PAYLOAD`]).
pub fn transport_config_with_streams(
    keep_alive: Option<Duration>,
    idle: Duration,
    streams: PeerStreams,
    largest_payload: u16,
) -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.max_idle_timeout(Some(
        quinn::IdleTimeout::try_from(idle).expect("mesh idle timeouts fit"),
    ));
    t.keep_alive_interval(keep_alive);
    t.max_concurrent_bidi_streams(streams.bidi.into());
    t.max_concurrent_uni_streams(streams.uni.into());
    let mut mtu = quinn::MtuDiscoveryConfig::default();
    mtu.upper_bound(largest_payload);
    t.mtu_discovery_config(Some(mtu));
    Arc::new(t)
}

#[cfg(test)]
mod tests {
    use super::*;

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

    /// One TLS 1.3 handshake over loopback TCP between a server built
    /// from `server` and a client built from `client`; the client's view
    /// of the server's identity, or the handshake's error.
    fn tls_over_tcp(server: &Credentials, client: &Credentials) -> Result<Identity, String> {
        use std::io::{Read, Write};
        let alpn = b"trellis-test".to_vec();
        let sconf = Arc::new(
            server
                .tls_server_config(std::slice::from_ref(&alpn))
                .unwrap(),
        );
        let cconf = Arc::new(client.tls_client_config(&[alpn]).unwrap());
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let served = std::thread::spawn(move || {
            let (sock, _) = listener.accept().unwrap();
            let conn = rustls::ServerConnection::new(sconf).unwrap();
            let mut tls = rustls::StreamOwned::new(conn, sock);
            let mut got = [0u8; 5];
            tls.read_exact(&mut got).map(|_| got)
        });
        let sock = std::net::TcpStream::connect(addr).unwrap();
        let name = rustls::pki_types::ServerName::try_from(MESH_SERVER_NAME).unwrap();
        let conn = rustls::ClientConnection::new(cconf, name).unwrap();
        let mut tls = rustls::StreamOwned::new(conn, sock);
        let sent = tls.write_all(b"hello").and_then(|()| tls.flush());
        if sent.is_err() {
            // Whether or not our alert went out, the server stops reading.
            let _ = tls.sock.shutdown(std::net::Shutdown::Both);
        }
        let read = served.join().unwrap();
        sent.map_err(|e| e.to_string())?;
        assert_eq!(&read.map_err(|e| e.to_string())?, b"hello");
        let chain = tls.conn.peer_certificates().expect("a verified server");
        identity_of(&chain[0]).map_err(|e| e.to_string())
    }

    #[test]
    fn the_tls_configurations_work_over_tcp_for_the_mesh_and_nobody_else() {
        let ca = MeshCa::generate("test").unwrap();
        let relay =
            Credentials::issue(&ca, &Identity::new(Role::Relay, "eu", "par", "r1").unwrap())
                .unwrap();
        let node = Credentials::issue(&ca, &Identity::new(Role::Node, "eu", "par", "n1").unwrap())
            .unwrap();
        assert_eq!(tls_over_tcp(&relay, &node).unwrap(), relay.identity);

        let other = MeshCa::generate("other").unwrap();
        let stranger = Credentials::issue(
            &other,
            &Identity::new(Role::Node, "eu", "par", "n1").unwrap(),
        )
        .unwrap();
        assert!(tls_over_tcp(&relay, &stranger).is_err());
        assert!(tls_over_tcp(&stranger, &node).is_err());
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
    fn an_operator_gets_an_ed25519_key_that_signs_and_verifies() {
        let ca = MeshCa::generate("test").unwrap();
        let alice = Identity::new(Role::Operator, "", "", "alice").unwrap();
        let issued = ca.issue(&alice, 30).unwrap();
        // Loaded from files the way the CLI loads an operator's credentials.
        let dir = tempfile::tempdir().unwrap();
        ca.save(dir.path()).unwrap();
        let (cert, key) = issued.save(dir.path(), false).unwrap();
        let op = Credentials::load(&dir.path().join(CA_CERT_FILE), &cert, &key).unwrap();
        assert_eq!(op.identity, alice);
        assert_eq!(op.algorithm(), KeyAlgorithm::Ed25519);
        let sig = op.sign(b"bundle").unwrap();
        assert_eq!(sig.len(), 64, "an Ed25519 signature");
        let hub =
            Credentials::issue(&ca, &Identity::new(Role::Hub, "eu", "", "h1").unwrap()).unwrap();
        let signer = hub.verify_signer(op.cert_der()).unwrap();
        assert_eq!(signer.algorithm(), KeyAlgorithm::Ed25519);
        assert_eq!(signer.identity, alice);
        signer.verify(b"bundle", &sig).unwrap();
        assert!(signer.verify(b"bundlf", &sig).is_err(), "altered message");
        // The key still serves for mutual TLS.
        let transport = transport_config(None, IDLE_TIMEOUT);
        op.client_config(&[b"test".to_vec()], transport.clone())
            .unwrap();
        op.server_config(&[b"test".to_vec()], transport).unwrap();
    }

    #[test]
    fn members_other_than_operators_keep_p256_keys() {
        let ca = MeshCa::generate("test").unwrap();
        for id in [
            Identity::new(Role::Node, "eu", "par", "n1").unwrap(),
            Identity::new(Role::Relay, "eu", "par", "r1").unwrap(),
            Identity::new(Role::Hub, "eu", "", "h1").unwrap(),
        ] {
            let creds = Credentials::issue(&ca, &id).unwrap();
            assert_eq!(creds.algorithm(), KeyAlgorithm::EcdsaP256, "{id}");
            let sig = creds.sign(b"entry").unwrap();
            let signer = creds.verify_signer(creds.cert_der()).unwrap();
            assert_eq!(signer.algorithm(), KeyAlgorithm::EcdsaP256);
            signer.verify(b"entry", &sig).unwrap();
        }
    }

    #[test]
    fn a_signature_of_one_algorithm_never_verifies_as_the_other() {
        let ca = MeshCa::generate("test").unwrap();
        let op = Credentials::issue(
            &ca,
            &Identity::new(Role::Operator, "", "", "alice").unwrap(),
        )
        .unwrap();
        let hub =
            Credentials::issue(&ca, &Identity::new(Role::Hub, "eu", "", "h1").unwrap()).unwrap();
        let ed_sig = op.sign(b"msg").unwrap();
        let ec_sig = hub.sign(b"msg").unwrap();
        let op_signer = hub.verify_signer(op.cert_der()).unwrap();
        let hub_signer = op.verify_signer(hub.cert_der()).unwrap();
        op_signer.verify(b"msg", &ed_sig).unwrap();
        hub_signer.verify(b"msg", &ec_sig).unwrap();
        assert!(op_signer.verify(b"msg", &ec_sig).is_err());
        assert!(hub_signer.verify(b"msg", &ed_sig).is_err());
        assert!(hub.verify_signed(op.cert_der(), b"msg", &ec_sig).is_err());
        assert!(op.verify_signed(hub.cert_der(), b"msg", &ed_sig).is_err());
    }

    #[test]
    fn the_key_algorithm_is_read_from_the_certificate() {
        let ca = MeshCa::generate("test").unwrap();
        let issued = ca
            .issue(&Identity::new(Role::Operator, "", "", "alice").unwrap(), 1)
            .unwrap();
        let der = CertificateDer::from_pem_slice(issued.cert_pem.as_bytes()).unwrap();
        assert_eq!(key_algorithm_of(&der).unwrap(), KeyAlgorithm::Ed25519);
        let ca_der = CertificateDer::from_pem_slice(ca.cert_pem().as_bytes()).unwrap();
        assert_eq!(key_algorithm_of(&ca_der).unwrap(), KeyAlgorithm::EcdsaP256);
        let p384_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
        let p384 = CertificateParams::new(vec!["x".into()])
            .unwrap()
            .self_signed(&p384_key)
            .unwrap();
        let err = key_algorithm_of(p384.der()).unwrap_err();
        assert!(matches!(err, TlsError::UnsupportedKey(_)), "{err}");
        assert!(matches!(
            key_algorithm_of(b"garbage"),
            Err(TlsError::NotTrellis(_))
        ));
    }

    #[test]
    fn garbage_pem_is_a_clear_error() {
        let err = Credentials::from_pem("nope", "nope", "nope").unwrap_err();
        assert!(matches!(err, TlsError::BadPem { .. }), "{err}");
    }
}

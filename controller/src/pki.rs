//! Tenant certificate authorities and site certificates. No I/O: the database and the API
//! call these with rows and request bodies.
//!
//! - Each tenant has its own CA (ECDSA P-256, `CN=Patronus tenant <id> CA`), created on first
//!   use; its private key is stored sealed ([`seal`]/[`unseal`], ChaCha20-Poly1305 under the
//!   controller's master key, the tenant id bound in as associated data so a sealed key moved
//!   to another tenant's row does not open).
//! - A site certificate's subject is `CN=<site id>, O=<tenant id>`, with the SAN URI
//!   `urn:patronus:tenant:<tenant>:site:<site>`; it is a client-and-server leaf (no CA), with the
//!   configured lifetime.
//! - CSRs are checked here with x509-parser before anything is signed: parseable, signature
//!   valid, subject naming exactly the token's site and tenant, key ECDSA P-256/P-384 or
//!   Ed25519 (RSA and other curves are refused).

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Nonce};
use patronus_proto::{SiteId, TenantId};
use rand::RngCore;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::oid_registry::{
    OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_NIST_EC_P384, OID_PKCS1_RSAENCRYPTION,
    OID_SIG_ED25519,
};
use x509_parser::prelude::FromDer;

/// Largest CSR accepted (a P-384 CSR is well under 1 KiB).
pub const MAX_CSR_BYTES: usize = 8 * 1024;
const SEAL_LABEL: &[u8] = b"patronus tenant ca key v1";
const NONCE_LEN: usize = 12;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CsrError {
    #[error("the CSR is not PEM or DER of a PKCS#10 request")]
    Malformed,
    #[error("the CSR is larger than {MAX_CSR_BYTES} bytes")]
    TooLarge,
    #[error("the CSR's signature does not verify")]
    BadSignature,
    #[error("the CSR's subject must be exactly CN=<site id>, O=<tenant id> ({0})")]
    WrongSubject(String),
    #[error("the CSR's key is {0}; use an ECDSA P-256 (or P-384) or Ed25519 key")]
    WeakKey(String),
}

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("certificate generation: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("the tenant CA key does not open with this master key (wrong key or tampered row)")]
    Unseal,
    #[error("the tenant CA certificate is unreadable: {0}")]
    CaCertificate(String),
}

/// A freshly made tenant CA: its certificate and its private key (PKCS#8 PEM, to be sealed).
pub struct NewCa {
    pub certificate_pem: String,
    pub private_key_pem: String,
    pub not_after: chrono::DateTime<chrono::Utc>,
}

fn offset(at: chrono::DateTime<chrono::Utc>) -> time::OffsetDateTime {
    time::OffsetDateTime::from_unix_timestamp(at.timestamp())
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
}

/// Make a tenant's CA, valid from `now` for `lifetime_days`.
pub fn create_ca(
    tenant: TenantId,
    now: chrono::DateTime<chrono::Utc>,
    lifetime_days: u32,
) -> Result<NewCa, PkiError> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, format!("Patronus tenant {tenant} CA"));
    name.push(DnType::OrganizationName, tenant.to_string());
    params.distinguished_name = name;
    // Leaves only: a tenant CA never signs another CA.
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.serial_number = Some(random_serial().0);
    let not_after = now + chrono::Duration::days(i64::from(lifetime_days));
    params.not_before = offset(now - chrono::Duration::minutes(5));
    params.not_after = offset(not_after);
    let certificate = params.self_signed(&key)?;
    Ok(NewCa {
        certificate_pem: certificate.pem(),
        private_key_pem: key.serialize_pem(),
        not_after,
    })
}

/// 16 random bytes, top bit clear (a positive INTEGER), and their hex for the database.
pub fn random_serial() -> (SerialNumber, String) {
    let mut bytes = [0u8; 16];
    rand::thread_rng().fill_bytes(&mut bytes);
    bytes[0] &= 0x7f;
    bytes[0] |= 0x01; // never a leading zero byte, so the hex is stable
    let hex = bytes.iter().map(|b| format!("{b:02x}")).collect();
    (SerialNumber::from_slice(&bytes), hex)
}

/// Seal a CA private key for storage.
pub fn seal(master_key: &[u8; 32], tenant: TenantId, plaintext: &[u8]) -> Vec<u8> {
    let cipher = ChaCha20Poly1305::new(master_key.into());
    let mut nonce = [0u8; NONCE_LEN];
    rand::thread_rng().fill_bytes(&mut nonce);
    let aad = [SEAL_LABEL, tenant.0.as_bytes()].concat();
    let mut out = nonce.to_vec();
    // Encryption with a valid key and nonce cannot fail for in-memory buffers.
    out.extend(
        cipher
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: plaintext,
                    aad: &aad,
                },
            )
            .unwrap_or_default(),
    );
    out
}

/// Open what [`seal`] made, for the same tenant.
pub fn unseal(master_key: &[u8; 32], tenant: TenantId, sealed: &[u8]) -> Result<Vec<u8>, PkiError> {
    if sealed.len() <= NONCE_LEN {
        return Err(PkiError::Unseal);
    }
    let (nonce, ciphertext) = sealed.split_at(NONCE_LEN);
    let aad = [SEAL_LABEL, tenant.0.as_bytes()].concat();
    ChaCha20Poly1305::new(master_key.into())
        .decrypt(
            Nonce::from_slice(nonce),
            Payload {
                msg: ciphertext,
                aad: &aad,
            },
        )
        .map_err(|_| PkiError::Unseal)
}

/// A CSR that passed [`check_csr`]: its DER, ready to sign.
#[derive(Debug)]
pub struct CheckedCsr {
    der: Vec<u8>,
}

/// Decode a CSR given as PEM (`-----BEGIN CERTIFICATE REQUEST-----`) or base64 DER.
fn csr_der(text: &str) -> Result<Vec<u8>, CsrError> {
    if text.len() > MAX_CSR_BYTES * 2 {
        return Err(CsrError::TooLarge);
    }
    let der = match pem::parse(text) {
        Ok(block)
            if block.tag() == "CERTIFICATE REQUEST" || block.tag() == "NEW CERTIFICATE REQUEST" =>
        {
            block.into_contents()
        }
        Ok(_) => return Err(CsrError::Malformed),
        Err(_) => base64::Engine::decode(&base64::engine::general_purpose::STANDARD, text.trim())
            .map_err(|_| CsrError::Malformed)?,
    };
    if der.len() > MAX_CSR_BYTES {
        return Err(CsrError::TooLarge);
    }
    Ok(der)
}

/// Check a CSR for `site` of `tenant`: well-formed, self-signature valid, subject exactly
/// `CN=<site>, O=<tenant>`, and a strong key.
pub fn check_csr(text: &str, tenant: TenantId, site: SiteId) -> Result<CheckedCsr, CsrError> {
    let der = csr_der(text)?;
    let (rest, csr) = X509CertificationRequest::from_der(&der).map_err(|_| CsrError::Malformed)?;
    if !rest.is_empty() {
        return Err(CsrError::Malformed);
    }
    let info = &csr.certification_request_info;
    let spki = &info.subject_pki;
    let algorithm = &spki.algorithm.algorithm;
    if *algorithm == OID_KEY_TYPE_EC_PUBLIC_KEY {
        let curve = spki
            .algorithm
            .parameters
            .as_ref()
            .and_then(|p| p.as_oid().ok());
        match curve {
            Some(c) if c == OID_EC_P256 || c == OID_NIST_EC_P384 => {}
            Some(c) => return Err(CsrError::WeakKey(format!("an EC key on curve {c}"))),
            None => return Err(CsrError::WeakKey("an EC key without a named curve".into())),
        }
    } else if *algorithm == OID_SIG_ED25519 {
    } else if *algorithm == OID_PKCS1_RSAENCRYPTION {
        let bits = spki.parsed().map(|k| k.key_size()).unwrap_or(0);
        return Err(CsrError::WeakKey(format!("RSA-{bits}")));
    } else {
        return Err(CsrError::WeakKey(format!("of type {algorithm}")));
    }
    csr.verify_signature().map_err(|_| CsrError::BadSignature)?;

    let subject = &info.subject;
    let values = |it: &mut dyn Iterator<Item = &x509_parser::x509::AttributeTypeAndValue>| {
        it.map(|a| a.as_str().unwrap_or("<not a string>").to_owned())
            .collect::<Vec<_>>()
    };
    let common_names = values(&mut subject.iter_common_name());
    let organizations = values(&mut subject.iter_organization());
    let attribute_count = subject.iter_attributes().count();
    let wanted_cn = site.to_string();
    let wanted_o = tenant.to_string();
    if common_names != [wanted_cn.as_str()]
        || organizations != [wanted_o.as_str()]
        || attribute_count != 2
    {
        return Err(CsrError::WrongSubject(format!(
            "got {subject}; expected CN={wanted_cn}, O={wanted_o}"
        )));
    }
    Ok(CheckedCsr { der })
}

/// A signed site certificate.
#[derive(Debug, Clone)]
pub struct IssuedCertificate {
    pub certificate_pem: String,
    pub serial_hex: String,
    pub subject: String,
    pub not_before: chrono::DateTime<chrono::Utc>,
    pub not_after: chrono::DateTime<chrono::Utc>,
}

/// The SAN URI naming a site.
pub fn site_uri(tenant: TenantId, site: SiteId) -> String {
    format!("urn:patronus:tenant:{tenant}:site:{site}")
}

/// Sign a checked CSR with the tenant's CA: the certificate's subject and extensions are the
/// CA's choice, only the public key comes from the request.
pub fn sign_site_certificate(
    ca_certificate_pem: &str,
    ca_key_pem: &str,
    csr: &CheckedCsr,
    tenant: TenantId,
    site: SiteId,
    now: chrono::DateTime<chrono::Utc>,
    lifetime_days: u32,
) -> Result<IssuedCertificate, PkiError> {
    let ca_key = KeyPair::from_pem(ca_key_pem)?;
    let issuer = Issuer::from_ca_cert_pem(ca_certificate_pem, ca_key)
        .map_err(|e| PkiError::CaCertificate(e.to_string()))?;
    let request = CertificateSigningRequestParams::from_der(&csr.der.as_slice().into())?;
    let mut params = CertificateParams::default();
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, site.to_string());
    name.push(DnType::OrganizationName, tenant.to_string());
    params.distinguished_name = name;
    params.subject_alt_names =
        vec![SanType::URI(site_uri(tenant, site).try_into().map_err(
            |_| PkiError::CaCertificate("site URI is not IA5".into()),
        )?)];
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ClientAuth,
        ExtendedKeyUsagePurpose::ServerAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    let (serial, serial_hex) = random_serial();
    params.serial_number = Some(serial);
    let not_before = now - chrono::Duration::minutes(5);
    let not_after = now + chrono::Duration::days(i64::from(lifetime_days));
    params.not_before = offset(not_before);
    params.not_after = offset(not_after);
    let certificate = CertificateSigningRequestParams {
        params,
        public_key: request.public_key,
    }
    .signed_by(&issuer)?;
    Ok(IssuedCertificate {
        certificate_pem: certificate.pem(),
        serial_hex,
        subject: format!("CN={site}, O={tenant}"),
        not_before,
        not_after,
    })
}

/// One revoked certificate for the CRL.
#[derive(Debug, Clone)]
pub struct RevokedSerial {
    pub serial_hex: String,
    pub revoked_at: chrono::DateTime<chrono::Utc>,
}

/// How long a CRL is valid; it is regenerated on every request, so this only bounds how stale
/// a cached copy may be.
pub const CRL_VALIDITY_HOURS: i64 = 24;

/// The tenant's certificate revocation list (PEM), signed by its CA. The CRL number is the
/// issue time in seconds, so it rises with every new list.
pub fn build_crl(
    ca_certificate_pem: &str,
    ca_key_pem: &str,
    revoked: &[RevokedSerial],
    now: chrono::DateTime<chrono::Utc>,
) -> Result<String, PkiError> {
    let ca_key = KeyPair::from_pem(ca_key_pem)?;
    let issuer = Issuer::from_ca_cert_pem(ca_certificate_pem, ca_key)
        .map_err(|e| PkiError::CaCertificate(e.to_string()))?;
    let mut revoked_certs = Vec::with_capacity(revoked.len());
    for entry in revoked {
        let bytes = (0..entry.serial_hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(entry.serial_hex.get(i..i + 2).unwrap_or("zz"), 16))
            .collect::<Result<Vec<u8>, _>>()
            .map_err(|_| {
                PkiError::CaCertificate(format!("serial {:?} is not hex", entry.serial_hex))
            })?;
        revoked_certs.push(rcgen::RevokedCertParams {
            serial_number: SerialNumber::from_slice(&bytes),
            revocation_time: offset(entry.revoked_at),
            reason_code: None,
            invalidity_date: None,
        });
    }
    let params = rcgen::CertificateRevocationListParams {
        this_update: offset(now),
        next_update: offset(now + chrono::Duration::hours(CRL_VALIDITY_HOURS)),
        crl_number: SerialNumber::from_slice(&now.timestamp().to_be_bytes()),
        issuing_distribution_point: None,
        revoked_certs,
        key_identifier_method: rcgen::KeyIdMethod::Sha256,
    };
    Ok(params.signed_by(&issuer)?.pem()?)
}

/// A CSR for a site, as the edge makes it (here so tests and the edge share one definition).
pub fn site_csr_pem(key: &KeyPair, tenant: TenantId, site: SiteId) -> Result<String, PkiError> {
    let mut params = CertificateParams::default();
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, site.to_string());
    name.push(DnType::OrganizationName, tenant.to_string());
    params.distinguished_name = name;
    Ok(params.serialize_request(key)?.pem()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use uuid::Uuid;
    use x509_parser::prelude::{FromDer, X509Certificate};

    fn ids() -> (TenantId, SiteId) {
        (TenantId(Uuid::new_v4()), SiteId(Uuid::new_v4()))
    }

    #[test]
    fn a_site_certificate_names_the_site_and_tenant_and_chains_to_the_tenant_ca() {
        let (tenant, site) = ids();
        let now = chrono::Utc::now();
        let ca = create_ca(tenant, now, 3650).unwrap();
        let key = KeyPair::generate().unwrap();
        let csr = check_csr(&site_csr_pem(&key, tenant, site).unwrap(), tenant, site).unwrap();
        let issued = sign_site_certificate(
            &ca.certificate_pem,
            &ca.private_key_pem,
            &csr,
            tenant,
            site,
            now,
            90,
        )
        .unwrap();
        let der = pem::parse(&issued.certificate_pem).unwrap().into_contents();
        let (_, cert) = X509Certificate::from_der(&der).unwrap();
        assert_eq!(
            cert.subject()
                .iter_common_name()
                .next()
                .unwrap()
                .as_str()
                .unwrap(),
            site.to_string()
        );
        let ca_der = pem::parse(&ca.certificate_pem).unwrap().into_contents();
        let (_, ca_cert) = X509Certificate::from_der(&ca_der).unwrap();
        cert.verify_signature(Some(ca_cert.public_key())).unwrap();
        assert!(!cert.is_ca());
        let san = cert.subject_alternative_name().unwrap().unwrap();
        assert!(format!("{:?}", san.value).contains(&site_uri(tenant, site)));
        let days = (cert.validity().not_after.timestamp() - now.timestamp()) / 86_400;
        assert_eq!(days, 90);
        assert_eq!(
            issued.serial_hex,
            cert.raw_serial_as_string().replace(':', "")
        );
    }

    #[test]
    fn csrs_for_another_site_or_tenant_are_refused() {
        let (tenant, site) = ids();
        let (other_tenant, other_site) = ids();
        let key = KeyPair::generate().unwrap();
        for (t, s) in [(tenant, other_site), (other_tenant, site)] {
            let pem = site_csr_pem(&key, t, s).unwrap();
            assert!(matches!(
                check_csr(&pem, tenant, site),
                Err(CsrError::WrongSubject(_))
            ));
        }
        // An extra attribute is refused too.
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::CommonName, site.to_string());
        params
            .distinguished_name
            .push(DnType::OrganizationName, tenant.to_string());
        params.distinguished_name.push(DnType::CountryName, "XX");
        let pem = params.serialize_request(&key).unwrap().pem().unwrap();
        assert!(matches!(
            check_csr(&pem, tenant, site),
            Err(CsrError::WrongSubject(_))
        ));
    }

    #[test]
    fn a_tampered_csr_fails_its_signature_and_garbage_is_malformed() {
        let (tenant, site) = ids();
        let key = KeyPair::generate().unwrap();
        let pem_text = site_csr_pem(&key, tenant, site).unwrap();
        let mut der = pem::parse(&pem_text).unwrap().into_contents();
        // Flip a bit in the last byte of the signature.
        let last = der.len() - 1;
        der[last] ^= 1;
        let tampered = pem::encode(&pem::Pem::new("CERTIFICATE REQUEST", der));
        assert_eq!(
            check_csr(&tampered, tenant, site).unwrap_err(),
            CsrError::BadSignature
        );
        assert_eq!(
            check_csr("hello", tenant, site).unwrap_err(),
            CsrError::Malformed
        );
        assert_eq!(
            check_csr(&"A".repeat(100_000), tenant, site).unwrap_err(),
            CsrError::TooLarge
        );
    }

    #[test]
    fn ed25519_and_p384_keys_are_accepted() {
        let (tenant, site) = ids();
        for alg in [&rcgen::PKCS_ED25519, &rcgen::PKCS_ECDSA_P384_SHA384] {
            let key = KeyPair::generate_for(alg).unwrap();
            check_csr(&site_csr_pem(&key, tenant, site).unwrap(), tenant, site).unwrap();
        }
    }

    #[test]
    fn the_crl_lists_revoked_serials_under_the_ca_signature() {
        let (tenant, site) = ids();
        let now = chrono::Utc::now();
        let ca = create_ca(tenant, now, 3650).unwrap();
        let key = KeyPair::generate().unwrap();
        let csr = check_csr(&site_csr_pem(&key, tenant, site).unwrap(), tenant, site).unwrap();
        let issued = sign_site_certificate(
            &ca.certificate_pem,
            &ca.private_key_pem,
            &csr,
            tenant,
            site,
            now,
            90,
        )
        .unwrap();
        let crl_pem = build_crl(
            &ca.certificate_pem,
            &ca.private_key_pem,
            &[RevokedSerial {
                serial_hex: issued.serial_hex.clone(),
                revoked_at: now,
            }],
            now,
        )
        .unwrap();
        let der = pem::parse(&crl_pem).unwrap().into_contents();
        let (_, crl) =
            x509_parser::revocation_list::CertificateRevocationList::from_der(&der).unwrap();
        let ca_der = pem::parse(&ca.certificate_pem).unwrap().into_contents();
        let (_, ca_cert) = X509Certificate::from_der(&ca_der).unwrap();
        crl.verify_signature(ca_cert.public_key()).unwrap();
        let listed: Vec<String> = crl
            .iter_revoked_certificates()
            .map(|r| r.raw_serial_as_string().replace(':', ""))
            .collect();
        assert_eq!(listed, vec![issued.serial_hex]);
    }

    #[test]
    fn sealed_keys_open_only_for_their_tenant_and_key() {
        let (tenant, _) = ids();
        let (other, _) = ids();
        let key = [3u8; 32];
        let sealed = seal(&key, tenant, b"secret key");
        assert_eq!(unseal(&key, tenant, &sealed).unwrap(), b"secret key");
        assert!(unseal(&key, other, &sealed).is_err());
        assert!(unseal(&[4u8; 32], tenant, &sealed).is_err());
        assert!(unseal(&key, tenant, &sealed[..5]).is_err());
        assert_ne!(
            seal(&key, tenant, b"secret key"),
            sealed,
            "nonces must differ"
        );
    }
}

//! The webhook's CA and serving certificate: generated, kept in a Secret of the operator's
//! namespace, and rotated together when a third of their validity is left (or when the hosts
//! they must name change). The CA bundle the API server trusts holds the new CA and the one
//! before it, so a rotation never leaves a window in which the served certificate is unknown.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use crate::k8s::{ByteString, MANAGED_BY, ObjectMeta, Secret};

const CA_CERT: &str = "ca.crt";
const CA_KEY: &str = "ca.key";
const PREVIOUS_CA: &str = "ca-previous.crt";
const TLS_CERT: &str = "tls.crt";
const TLS_KEY: &str = "tls.key";
/// When the certificates expire, in seconds since the epoch.
const NOT_AFTER: &str = "portcullis.dev/not-after";
/// The hosts the serving certificate names, comma-separated.
const HOSTS: &str = "portcullis.dev/hosts";

/// A CA and the serving certificate it signed, as PEM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Bundle {
    pub ca_cert: String,
    ca_key: String,
    pub cert: String,
    key: String,
    /// The CA before the last rotation, still trusted.
    previous_ca: Option<String>,
    /// Seconds since the epoch.
    pub not_after: i64,
    hosts: Vec<String>,
}

fn seconds(d: Duration) -> i64 {
    i64::try_from(d.as_secs()).unwrap_or(i64::MAX)
}

fn at(unix: i64) -> Result<time::OffsetDateTime, rcgen::Error> {
    time::OffsetDateTime::from_unix_timestamp(unix).map_err(|_| rcgen::Error::Time)
}

impl Bundle {
    /// A new CA and serving certificate for `hosts`, valid from `now` (minus five minutes of
    /// clock skew) for `validity`; `previous`'s CA stays trusted.
    pub(crate) fn generate(
        hosts: &[String],
        validity: Duration,
        now: i64,
        previous: Option<&Bundle>,
    ) -> Result<Bundle, rcgen::Error> {
        let not_before = at(now - 300)?;
        let not_after = now.saturating_add(seconds(validity));
        let ca_key = KeyPair::generate()?;
        let mut ca = CertificateParams::new(Vec::<String>::new())?;
        ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        ca.distinguished_name
            .push(DnType::CommonName, "portcullis-webhook-ca");
        ca.not_before = not_before;
        ca.not_after = at(not_after)?;
        let ca_cert = ca.self_signed(&ca_key)?;
        let ca_key_pem = ca_key.serialize_pem();
        let issuer = Issuer::new(ca, ca_key);
        let key = KeyPair::generate()?;
        let mut serving = CertificateParams::new(hosts.to_vec())?;
        serving
            .distinguished_name
            .push(DnType::CommonName, "portcullis-webhook");
        serving.not_before = not_before;
        serving.not_after = at(not_after)?;
        let cert = serving.signed_by(&key, &issuer)?;
        Ok(Bundle {
            ca_cert: ca_cert.pem(),
            ca_key: ca_key_pem,
            cert: cert.pem(),
            key: key.serialize_pem(),
            previous_ca: previous.map(|p| p.ca_cert.clone()),
            not_after,
            hosts: hosts.to_vec(),
        })
    }

    /// Whether to rotate at `now`: a third of `validity` or less is left, or the hosts changed.
    pub(crate) fn due(&self, now: i64, validity: Duration, hosts: &[String]) -> bool {
        self.hosts != hosts || now >= self.not_after - seconds(validity) / 3
    }

    /// The PEM the API server is told to trust: the CA and the one before it.
    pub(crate) fn ca_bundle(&self) -> String {
        match &self.previous_ca {
            Some(previous) => format!("{}{previous}", self.ca_cert),
            None => self.ca_cert.clone(),
        }
    }

    /// The bundle a Secret holds, if it holds a whole one.
    pub(crate) fn from_secret(secret: &Secret) -> Option<Bundle> {
        let data = secret.data.as_ref()?;
        let text = |key: &str| String::from_utf8(data.get(key)?.0.clone()).ok();
        let annotations = secret.metadata.annotations.as_ref()?;
        Some(Bundle {
            ca_cert: text(CA_CERT)?,
            ca_key: text(CA_KEY)?,
            cert: text(TLS_CERT)?,
            key: text(TLS_KEY)?,
            previous_ca: text(PREVIOUS_CA),
            not_after: annotations.get(NOT_AFTER)?.parse().ok()?,
            hosts: annotations
                .get(HOSTS)?
                .split(',')
                .filter(|h| !h.is_empty())
                .map(String::from)
                .collect(),
        })
    }

    /// The Secret `namespace/name` holding this bundle.
    pub(crate) fn to_secret(&self, namespace: &str, name: &str) -> Secret {
        let mut data = BTreeMap::from([
            (CA_CERT.to_string(), ByteString(self.ca_cert.clone().into())),
            (CA_KEY.to_string(), ByteString(self.ca_key.clone().into())),
            (TLS_CERT.to_string(), ByteString(self.cert.clone().into())),
            (TLS_KEY.to_string(), ByteString(self.key.clone().into())),
        ]);
        if let Some(previous) = &self.previous_ca {
            data.insert(PREVIOUS_CA.into(), ByteString(previous.clone().into()));
        }
        Secret {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some(namespace.into()),
                labels: Some(BTreeMap::from([(
                    MANAGED_BY.0.to_string(),
                    MANAGED_BY.1.to_string(),
                )])),
                annotations: Some(BTreeMap::from([
                    (NOT_AFTER.to_string(), self.not_after.to_string()),
                    (HOSTS.to_string(), self.hosts.join(",")),
                ])),
                ..ObjectMeta::default()
            },
            type_: Some("kubernetes.io/tls".into()),
            data: Some(data),
            ..Secret::default()
        }
    }

    /// The serving certificate and key, for rustls.
    pub(crate) fn certified_key(&self) -> Result<Arc<CertifiedKey>, String> {
        let chain = vec![
            CertificateDer::from_pem_slice(self.cert.as_bytes())
                .map_err(|e| format!("the serving certificate does not parse: {e}"))?,
        ];
        let key = PrivateKeyDer::from_pem_slice(self.key.as_bytes())
            .map_err(|e| format!("the serving key does not parse: {e}"))?;
        let signer = rustls::crypto::ring::sign::any_supported_type(&key)
            .map_err(|e| format!("the serving key cannot sign: {e}"))?;
        Ok(Arc::new(CertifiedKey::new(chain, signer)))
    }
}

/// The certificate the server presents, swapped on rotation without a restart.
#[derive(Debug, Default)]
pub(crate) struct CurrentCert(RwLock<Option<Arc<CertifiedKey>>>);

impl CurrentCert {
    pub(crate) fn set(&self, key: Arc<CertifiedKey>) {
        *self.0.write().expect("certificate lock") = Some(key);
    }
}

impl ResolvesServerCert for CurrentCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.0.read().expect("certificate lock").clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: Duration = Duration::from_secs(86_400);

    #[test]
    fn a_bundle_survives_its_secret_and_serves() {
        let hosts = vec!["127.0.0.1".to_string(), "portcullis.system.svc".to_string()];
        let bundle = Bundle::generate(&hosts, 90 * DAY, 1_800_000_000, None).unwrap();
        let secret = bundle.to_secret("portcullis-system", "portcullis-webhook-tls");
        assert_eq!(Bundle::from_secret(&secret).as_ref(), Some(&bundle));
        bundle.certified_key().expect("rustls takes the key");
    }

    #[test]
    fn rotation_is_due_with_a_third_left_or_new_hosts() {
        let hosts = vec!["127.0.0.1".to_string()];
        let now = 1_800_000_000;
        let bundle = Bundle::generate(&hosts, 90 * DAY, now, None).unwrap();
        assert!(!bundle.due(now + seconds(59 * DAY), 90 * DAY, &hosts));
        assert!(bundle.due(now + seconds(61 * DAY), 90 * DAY, &hosts));
        assert!(bundle.due(now, 90 * DAY, &["10.0.0.1".to_string()]));
    }

    #[test]
    fn after_a_rotation_both_cas_are_trusted() {
        let hosts = vec!["127.0.0.1".to_string()];
        let old = Bundle::generate(&hosts, DAY, 1_800_000_000, None).unwrap();
        let new = Bundle::generate(&hosts, DAY, 1_800_050_000, Some(&old)).unwrap();
        assert_ne!(old.ca_cert, new.ca_cert);
        assert!(new.ca_bundle().contains(&old.ca_cert) && new.ca_bundle().contains(&new.ca_cert));
    }
}

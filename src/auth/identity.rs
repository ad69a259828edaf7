//! The identity a verified client certificate names: its URI SAN (for example a SPIFFE id),
//! else its first DNS SAN, else its subject CN.

use x509_parser::{extensions::GeneralName, prelude::FromDer};

/// The identity of a DER certificate, or None when it names nothing usable.
pub fn certificate_identity(der: &[u8]) -> Option<String> {
    let (_, certificate) = x509_parser::certificate::X509Certificate::from_der(der).ok()?;
    let mut dns = None;
    if let Ok(Some(san)) = certificate.subject_alternative_name() {
        for name in &san.value.general_names {
            match name {
                GeneralName::URI(uri) => return Some((*uri).to_owned()),
                GeneralName::DNSName(name) if dns.is_none() => dns = Some((*name).to_owned()),
                _ => {}
            }
        }
    }
    if dns.is_some() {
        return dns;
    }
    certificate
        .subject()
        .iter_common_name()
        .next()
        .and_then(|common_name| common_name.as_str().ok())
        .map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use rcgen::{CertificateParams, DnType, KeyPair, SanType};

    use super::*;

    fn certificate(common_name: &str, sans: Vec<SanType>) -> Vec<u8> {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.subject_alt_names = sans;
        let key = KeyPair::generate().expect("key");
        params.self_signed(&key).expect("sign").der().to_vec()
    }

    #[test]
    fn uri_san_wins_then_dns_san_then_common_name() {
        let spiffe = certificate(
            "cn",
            vec![
                SanType::DnsName("billing.internal".try_into().expect("dns")),
                SanType::URI("spiffe://prod/billing".try_into().expect("uri")),
            ],
        );
        assert_eq!(
            certificate_identity(&spiffe).as_deref(),
            Some("spiffe://prod/billing")
        );
        let dns = certificate(
            "cn",
            vec![SanType::DnsName(
                "billing.internal".try_into().expect("dns"),
            )],
        );
        assert_eq!(
            certificate_identity(&dns).as_deref(),
            Some("billing.internal")
        );
        let common_name = certificate("billing", Vec::new());
        assert_eq!(
            certificate_identity(&common_name).as_deref(),
            Some("billing")
        );
        assert_eq!(certificate_identity(b"not a certificate"), None);
    }
}

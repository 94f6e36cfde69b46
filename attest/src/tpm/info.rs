//! What `ferry attest info` reports about a TPM: who made it, its firmware, its EK
//! certificate, and whether the node CA key exists. Operators run it before switching
//! `ca.backend` to `tpm`, and when attestation fails.

use std::fmt;

use serde::Serialize;
use tss_esapi::abstraction::{AsymmetricAlgorithmSelection, ek};
use tss_esapi::constants::PropertyTag;
use tss_esapi::interface_types::key_bits::RsaKeyBits;
use x509_parser::prelude::{FromDer, X509Certificate};

use super::{Tpm, TpmError};

/// The NV index of the RSA 2048 EK certificate (TCG EK Credential Profile).
pub const EK_CERT_NV_INDEX: u32 = 0x01c0_0002;

/// The facts `ferry attest info` prints.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TpmInfo {
    /// The TCTI the TPM was reached through.
    pub tcti: String,
    /// TPM2_PT_MANUFACTURER as ASCII (`IBM` for swtpm, `IFX`, `STM `, `NTC`, ...).
    pub manufacturer: String,
    /// The vendor strings (`SW TPM` for swtpm).
    pub vendor: String,
    /// Firmware version, `major.minor.build.patch` from TPM2_PT_FIRMWARE_VERSION_1/2.
    pub firmware: String,
    /// The RSA EK certificate from NV `0x01c00002`, when present.
    pub ek_certificate: Option<EkCertInfo>,
}

/// The parts of the EK certificate an operator checks against the manufacturer's CA.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EkCertInfo {
    /// The subject DN (often empty for EK certificates, whose identity is in the SAN).
    pub subject: String,
    /// The issuer DN: the manufacturer CA that must be in the verifier's list.
    pub issuer: String,
    /// The certificate, DER.
    #[serde(skip)]
    pub der: Vec<u8>,
}

fn ascii(v: u32) -> String {
    v.to_be_bytes()
        .iter()
        .filter(|b| b.is_ascii_graphic() || **b == b' ')
        .map(|b| char::from(*b))
        .collect::<String>()
        .trim()
        .to_owned()
}

impl TpmInfo {
    /// Asks `tpm` for its identity and EK certificate. A TPM without an EK certificate is
    /// not an error here (`ek_certificate: None`); attestation will refuse it.
    pub fn read(tpm: &Tpm) -> Result<Self, TpmError> {
        let tcti = tpm.tcti().to_owned();
        tpm.call(move |st| {
            let mut prop = |tag| {
                st.ctx
                    .get_tpm_property(tag)
                    .map(Option::unwrap_or_default)
                    .map_err(st.err("read TPM properties (TPM2_GetCapability)"))
            };
            let manufacturer = ascii(prop(PropertyTag::Manufacturer)?);
            let mut vendor = String::new();
            for tag in [
                PropertyTag::VendorString1,
                PropertyTag::VendorString2,
                PropertyTag::VendorString3,
                PropertyTag::VendorString4,
            ] {
                vendor.push_str(&ascii(prop(tag)?));
            }
            let (f1, f2) = (
                prop(PropertyTag::FirmwareVersion1)?,
                prop(PropertyTag::FirmwareVersion2)?,
            );
            let firmware = format!("{}.{}.{}.{}", f1 >> 16, f1 & 0xffff, f2 >> 16, f2 & 0xffff);
            let ek_certificate = ek::retrieve_ek_pubcert(
                &mut st.ctx,
                AsymmetricAlgorithmSelection::Rsa(RsaKeyBits::Rsa2048),
            )
            .ok()
            .map(|der| describe_cert(&der, &tcti))
            .transpose()?;
            Ok(Self {
                tcti,
                manufacturer,
                vendor,
                firmware,
                ek_certificate,
            })
        })?
    }
}

fn describe_cert(der: &[u8], tcti: &str) -> Result<EkCertInfo, TpmError> {
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| TpmError::BadObject {
        tcti: tcti.to_owned(),
        what: format!("EK certificate (NV {EK_CERT_NV_INDEX:#010x})"),
        reason: e.to_string(),
    })?;
    Ok(EkCertInfo {
        subject: cert.subject().to_string(),
        issuer: cert.issuer().to_string(),
        der: der.to_vec(),
    })
}

impl fmt::Display for TpmInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "TCTI:          {}", self.tcti)?;
        writeln!(f, "manufacturer:  {}", self.manufacturer)?;
        writeln!(f, "vendor:        {}", self.vendor)?;
        writeln!(f, "firmware:      {}", self.firmware)?;
        match &self.ek_certificate {
            Some(c) => {
                writeln!(f, "EK certificate (NV {EK_CERT_NV_INDEX:#010x}):")?;
                writeln!(f, "  subject:     {}", c.subject)?;
                write!(f, "  issuer:      {}", c.issuer)
            }
            None => write!(
                f,
                "EK certificate: none at NV {EK_CERT_NV_INDEX:#010x} (node attestation needs one)"
            ),
        }
    }
}

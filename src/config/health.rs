//! `[health]`: readiness beyond the database, the room left on disk and the memory in use.

use serde::{Deserialize, Serialize};
use smart_default::SmartDefault;

use super::BufferConfig;

#[derive(Debug, Clone, Serialize, Deserialize, SmartDefault)]
#[serde(default, deny_unknown_fields)]
pub struct HealthConfig {
    /// Health turns NOT_SERVING when a volume holding `data_dir` or the spool has less free
    /// space than this: a share of the volume (`5%`) or a size (`1GiB`, `500MB`).
    #[default(FreeSpace::Percent(5.0))]
    pub min_free_disk: FreeSpace,
    /// Health turns NOT_SERVING when the server's resident memory passes this many bytes.
    /// Default: `buffer.max_bytes` plus 256 MiB.
    pub max_rss: Option<u64>,
}

impl HealthConfig {
    /// The resident memory above which health turns NOT_SERVING.
    pub fn max_rss_bytes(&self, buffer: &BufferConfig) -> u64 {
        self.max_rss
            .unwrap_or(buffer.max_bytes as u64 + 256 * 1024 * 1024)
    }
}

/// Free space to keep on a volume: a share of its size, or a size.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum FreeSpace {
    Percent(f64),
    Bytes(u64),
}

impl FreeSpace {
    /// The free bytes required on a volume of `total` bytes.
    pub fn required(self, total: u64) -> u64 {
        match self {
            Self::Percent(percent) => (total as f64 * percent / 100.0) as u64,
            Self::Bytes(bytes) => bytes,
        }
    }
}

impl TryFrom<String> for FreeSpace {
    type Error = String;

    fn try_from(text: String) -> Result<Self, Self::Error> {
        let text = text.trim();
        if let Some(percent) = text.strip_suffix('%') {
            return match percent.trim().parse::<f64>() {
                Ok(percent) if (0.0..=100.0).contains(&percent) => Ok(Self::Percent(percent)),
                _ => Err(format!("{text:?} is not a percentage between 0% and 100%")),
            };
        }
        text.parse::<bytesize::ByteSize>()
            .map(|size| Self::Bytes(size.as_u64()))
            .map_err(|error| format!("{text:?} is neither a percentage nor a size: {error}"))
    }
}

impl From<FreeSpace> for String {
    fn from(space: FreeSpace) -> Self {
        match space {
            FreeSpace::Percent(percent) => format!("{percent}%"),
            FreeSpace::Bytes(bytes) => bytes.to_string(),
        }
    }
}

//! Value types that several sections share: secrets that never print, and durations that may
//! be `off`.

use serde::{Deserialize, Serialize};

/// A secret setting: shown as `<redacted>` in debug output and never serialized back.
#[derive(Clone, Deserialize)]
#[serde(transparent)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("<redacted>")
    }
}

impl Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str("<redacted>")
    }
}

/// A duration that may be `off` (or empty): None.
pub mod optional_duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    pub fn serialize<S: Serializer>(
        value: &Option<Duration>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        match value {
            Some(duration) => {
                serializer.serialize_str(&humantime::format_duration(*duration).to_string())
            }
            None => serializer.serialize_str("off"),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Option<Duration>, D::Error> {
        let text = String::deserialize(deserializer)?;
        match text.trim() {
            "" | "off" | "none" => Ok(None),
            text => humantime::parse_duration(text).map(Some).map_err(|error| {
                D::Error::custom(format!("{text:?} is not a duration or off: {error}"))
            }),
        }
    }
}

/// A list of secrets from a file's array, or from one comma-separated string (how an
/// environment variable gives a list: `SLUICE_REDIS__CLUSTER_NODES=redis://a:7000,redis://b:7001`).
pub mod secret_list {
    use serde::{Deserialize, Deserializer};

    use super::Secret;

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Given {
        List(Vec<String>),
        Text(String),
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Vec<Secret>, D::Error> {
        let items = match Given::deserialize(deserializer)? {
            Given::List(items) => items,
            Given::Text(text) => text.split(',').map(str::to_owned).collect(),
        };
        Ok(items
            .into_iter()
            .map(|item| item.trim().to_owned())
            .filter(|item| !item.is_empty())
            .map(Secret)
            .collect())
    }
}

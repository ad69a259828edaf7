//! A `jsonb` column read as the text PostgreSQL writes for it, neither parsed nor checked:
//! its binary form is a version byte and that text. The read side hands it on as it is
//! (Query's replies encode it straight to the wire, [`crate::proto::Metadata::from_stored_text`]).

use sqlx::{
    Decode, Postgres, Type,
    error::BoxDynError,
    postgres::{PgTypeInfo, PgValueFormat, PgValueRef},
};

/// The version byte that starts `jsonb`'s binary form (the only one PostgreSQL has written).
pub const JSONB_VERSION: u8 = 1;

/// A `jsonb` value's text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JsonbText(pub Vec<u8>);

#[derive(Debug, thiserror::Error)]
#[error("a jsonb value in binary form starts with version {0:?}, not 1")]
struct UnknownVersion(Option<u8>);

impl Type<Postgres> for JsonbText {
    fn type_info() -> PgTypeInfo {
        PgTypeInfo::with_name("jsonb")
    }
}

impl<'r> Decode<'r, Postgres> for JsonbText {
    fn decode(value: PgValueRef<'r>) -> Result<Self, BoxDynError> {
        let format = value.format();
        let bytes = value.as_bytes()?;
        match (format, bytes) {
            (PgValueFormat::Text, text) => Ok(Self(text.to_vec())),
            (PgValueFormat::Binary, [JSONB_VERSION, text @ ..]) => Ok(Self(text.to_vec())),
            (PgValueFormat::Binary, other) => Err(UnknownVersion(other.first().copied()).into()),
        }
    }
}

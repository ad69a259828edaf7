//! Object stores named by URL, for the archive and for backups: `file:///path` (written with
//! fsync) or `s3://bucket/prefix` (credentials, region and endpoint from the usual `AWS_*`
//! variables).

use std::{path::PathBuf, sync::Arc, time::Duration};

use object_store::{
    ObjectStore, RetryConfig, aws::AmazonS3Builder, local::LocalFileSystem, prefix::PrefixStore,
};

/// Why a URL names no store that can be used.
#[derive(Debug, thiserror::Error)]
pub enum ObjectsError {
    #[error("{url} is not a URL: {source}")]
    NotUrl {
        url: String,
        source: url::ParseError,
    },
    #[error("{url} names no bucket (s3://bucket/prefix)")]
    NoBucket { url: String },
    #[error("{url} is not an absolute file URL")]
    NotAbsoluteFile { url: String },
    #[error("scheme {scheme}: use file:///path or s3://bucket/prefix")]
    Scheme { scheme: String },
    #[error(transparent)]
    Store(#[from] object_store::Error),
}

/// Opens the store a URL names; the error says why it cannot be used.
pub fn open(url: &str) -> Result<Arc<dyn ObjectStore>, ObjectsError> {
    let parsed = url::Url::parse(url).map_err(|source| ObjectsError::NotUrl {
        url: url.to_owned(),
        source,
    })?;
    match parsed.scheme() {
        "file" => {
            // Rooted at `/` under a prefix rather than `new_with_prefix`, which needs the
            // directory to exist: it is created by the first write, not by merely reading.
            let directory = local_directory(url)?;
            let directory = directory.to_string_lossy();
            let directory = directory.trim_matches('/');
            // An object must survive a power cut before what it holds is dropped elsewhere.
            let store = LocalFileSystem::new().with_fsync(true);
            Ok(Arc::new(PrefixStore::new(store, directory)))
        }
        "s3" => {
            let bucket = parsed
                .host_str()
                .filter(|bucket| !bucket.is_empty())
                .ok_or_else(|| ObjectsError::NoBucket {
                    url: url.to_owned(),
                })?;
            // A store that cannot be reached is said within seconds (a Query answers
            // UNAVAILABLE, a lifecycle run tries again next time), not after the client's
            // default of ten retries over three minutes.
            let retry = RetryConfig {
                max_retries: 3,
                retry_timeout: Duration::from_secs(20),
                ..RetryConfig::default()
            };
            let store = AmazonS3Builder::from_env()
                .with_bucket_name(bucket)
                .with_retry(retry)
                .build()?;
            let prefix = parsed.path().trim_matches('/');
            Ok(if prefix.is_empty() {
                Arc::new(store)
            } else {
                Arc::new(PrefixStore::new(store, prefix))
            })
        }
        scheme => Err(ObjectsError::Scheme {
            scheme: scheme.to_owned(),
        }),
    }
}

/// The directory of a `file://` URL.
pub fn local_directory(url: &str) -> Result<PathBuf, ObjectsError> {
    url::Url::parse(url)
        .ok()
        .filter(|parsed| parsed.scheme() == "file")
        .and_then(|parsed| parsed.to_file_path().ok())
        .ok_or_else(|| ObjectsError::NotAbsoluteFile {
            url: url.to_owned(),
        })
}

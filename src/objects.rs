//! Object stores named by URL, for the archive and for backups: `file:///path` (written with
//! fsync) or `s3://bucket/prefix` (credentials, region and endpoint from the usual `AWS_*`
//! variables).

use std::sync::Arc;

use object_store::{
    ObjectStore, aws::AmazonS3Builder, local::LocalFileSystem, prefix::PrefixStore,
};

/// Opens the store a URL names; the error says why it cannot be used.
pub fn open(url: &str) -> Result<Arc<dyn ObjectStore>, String> {
    let parsed = url::Url::parse(url).map_err(|error| format!("{url} is not a URL: {error}"))?;
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
                .ok_or_else(|| format!("{url} names no bucket (s3://bucket/prefix)"))?;
            let store = AmazonS3Builder::from_env()
                .with_bucket_name(bucket)
                .build()
                .map_err(|error| error.to_string())?;
            let prefix = parsed.path().trim_matches('/');
            Ok(if prefix.is_empty() {
                Arc::new(store)
            } else {
                Arc::new(PrefixStore::new(store, prefix))
            })
        }
        scheme => Err(format!(
            "scheme {scheme}: use file:///path or s3://bucket/prefix"
        )),
    }
}

/// The directory of a `file://` URL.
pub fn local_directory(url: &str) -> Result<std::path::PathBuf, String> {
    url::Url::parse(url)
        .ok()
        .filter(|parsed| parsed.scheme() == "file")
        .and_then(|parsed| parsed.to_file_path().ok())
        .ok_or_else(|| format!("{url} is not an absolute file URL"))
}

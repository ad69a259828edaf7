//! Readiness beyond the database: the free space on the volumes sluice writes to (the data
//! directory, which holds the private cluster, and the spool) and the server's resident memory.

use std::path::{Path, PathBuf};

use crate::{
    config::{Config, FreeSpace},
    metrics,
};

/// The disk and memory limits, and where to look.
#[derive(Debug, Clone)]
pub struct Resources {
    /// (label, path) of each watched volume.
    volumes: Vec<(&'static str, PathBuf)>,
    min_free: FreeSpace,
    max_rss: u64,
}

impl Resources {
    pub fn new(config: &Config) -> Self {
        let mut volumes = vec![("data", config.data_dir.clone())];
        if config.spool.enabled {
            volumes.push(("spool", config.spool_dir()));
        }
        Self {
            volumes,
            min_free: config.health.min_free_disk,
            max_rss: config.health.max_rss_bytes(&config.buffer),
        }
    }

    /// Why a volume is short of space, if one is. Exports the free bytes of each volume.
    pub fn disk_shortage(&self) -> Option<String> {
        let mut shortage = None;
        for (label, path) in &self.volumes {
            let Some(space) = volume_space(path) else {
                continue;
            };
            metrics::disk_free(label, space.free);
            let required = self.min_free.required(space.total);
            if space.free < required && shortage.is_none() {
                shortage = Some(format!(
                    "{} free on the {label} volume ({}), under the {} required",
                    bytesize::ByteSize(space.free),
                    path.display(),
                    bytesize::ByteSize(required),
                ));
            }
        }
        shortage
    }

    /// Why memory is over its limit, if it is. Exports the resident bytes.
    pub fn memory_excess(&self) -> Option<String> {
        let resident = resident_bytes()?;
        metrics::resident_memory(resident);
        (resident > self.max_rss).then(|| {
            format!(
                "resident memory {} is over the {} limit",
                bytesize::ByteSize(resident),
                bytesize::ByteSize(self.max_rss),
            )
        })
    }
}

#[derive(Debug, Clone, Copy)]
struct Space {
    total: u64,
    /// Available to an unprivileged process (`f_bavail`), as PostgreSQL and the spool see it.
    free: u64,
}

/// The size and free space of the volume holding `path` (or its nearest existing ancestor:
/// the spool directory may not exist yet).
fn volume_space(path: &Path) -> Option<Space> {
    let existing = path.ancestors().find(|ancestor| ancestor.exists())?;
    let stats = nix::sys::statvfs::statvfs(existing).ok()?;
    let block = stats.fragment_size() as u64;
    Some(Space {
        total: stats.blocks() as u64 * block,
        free: stats.blocks_available() as u64 * block,
    })
}

/// This process's resident set size, from `/proc/self/statm`.
fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    let page_size = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()?;
    Some(pages * page_size as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resources(min_free: FreeSpace, max_rss: u64) -> Resources {
        Resources {
            volumes: vec![("data", std::env::temp_dir())],
            min_free,
            max_rss,
        }
    }

    #[test]
    fn a_volume_under_the_free_space_limit_is_reported() {
        let shortage = resources(FreeSpace::Percent(100.0), u64::MAX).disk_shortage();
        let reason = shortage.expect("no volume has 100% free");
        assert!(reason.contains("data volume"), "{reason}");
        assert!(
            resources(FreeSpace::Bytes(0), u64::MAX)
                .disk_shortage()
                .is_none()
        );
    }

    #[test]
    fn memory_over_the_limit_is_reported() {
        assert!(resources(FreeSpace::Bytes(0), 1).memory_excess().is_some());
        assert!(
            resources(FreeSpace::Bytes(0), u64::MAX)
                .memory_excess()
                .is_none()
        );
    }

    #[test]
    fn free_space_reads_a_share_or_a_size() {
        assert_eq!(
            FreeSpace::try_from("5%".to_owned()),
            Ok(FreeSpace::Percent(5.0))
        );
        assert_eq!(
            FreeSpace::try_from("1GiB".to_owned()),
            Ok(FreeSpace::Bytes(1 << 30))
        );
        assert!(FreeSpace::try_from("150%".to_owned()).is_err());
        assert!(FreeSpace::try_from("lots".to_owned()).is_err());
        assert_eq!(FreeSpace::Percent(5.0).required(1000), 50);
    }
}

//! A private PostgreSQL cluster under the data directory, used when no database URL is set.
//!
//! The cluster listens only on a unix socket inside the data directory (no TCP port), trusts
//! local connections, and is stopped when the server stops. When sluice runs as root, the
//! cluster runs as the `postgres` system user, since PostgreSQL refuses to run as root.

use std::{
    fs,
    os::unix::{fs::PermissionsExt, process::CommandExt},
    path::{Path, PathBuf},
    process::{Command, Output},
};

use sqlx::postgres::PgConnectOptions;

/// Name of the role and database sluice uses in its private cluster.
const ROLE: &str = "sluice";
/// Unix socket paths are limited to 107 bytes; keep room for `/.s.PGSQL.5432`.
const MAX_SOCKET_DIR_LEN: usize = 90;

#[derive(Debug, thiserror::Error)]
pub enum EmbeddedError {
    #[error(
        "no PostgreSQL server binaries found (looked on PATH, via pg_config --bindir, and under /usr/lib/postgresql/*/bin); install them (Debian: apt-get install postgresql) or set DATABASE_URL"
    )]
    BinariesNotFound,
    #[error(
        "running as root but there is no `postgres` system user to run PostgreSQL as; create it or set DATABASE_URL"
    )]
    NoPostgresUser,
    #[error("cannot prepare {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{command} failed: {detail}")]
    Command { command: String, detail: String },
}

/// The file of settings sluice writes at each start, and the line that includes it.
const SETTINGS_FILE: &str = "sluice.conf";
const INCLUDE_LINE: &str = "include_if_exists = 'sluice.conf'";

/// A running private cluster. Call [`EmbeddedPostgres::stop`] on shutdown.
#[derive(Debug)]
pub struct EmbeddedPostgres {
    bin_dir: PathBuf,
    /// The directory holding `postgres/` (the data directory) and the socket directory.
    root: PathBuf,
    data_dir: PathBuf,
    socket_dir: PathBuf,
    run_as: Option<nix::unistd::User>,
    /// Whether this process started the cluster (see [`Self::started_here`]).
    started_here: bool,
}

impl EmbeddedPostgres {
    /// Initializes the cluster under `root/postgres` if needed and starts it (or reuses one
    /// already running there, e.g. after a crash of sluice).
    pub fn start(root: &Path) -> Result<Self, EmbeddedError> {
        Self::start_cluster(root, None)
    }

    /// [`EmbeddedPostgres::start`] with server `settings` (name, value) written to the
    /// cluster's `sluice.conf`, which its `postgresql.conf` includes. A cluster found running
    /// is told to reload them (those that need a restart wait for one).
    pub fn start_with(root: &Path, settings: &[(&str, String)]) -> Result<Self, EmbeddedError> {
        Self::start_cluster(root, Some(settings))
    }

    fn start_cluster(
        root: &Path,
        settings: Option<&[(&str, String)]>,
    ) -> Result<Self, EmbeddedError> {
        let mut cluster = Self::locate(root)?;
        cluster.prepare_dirs()?;
        if !cluster.data_dir.join("PG_VERSION").exists() {
            tracing::info!(data_dir = %cluster.data_dir.display(), "initializing private PostgreSQL cluster");
            cluster.run(
                "initdb",
                &[
                    "-D",
                    path_str(&cluster.data_dir),
                    "-U",
                    ROLE,
                    "--auth=trust",
                    "--encoding=UTF8",
                    "--locale=C.UTF-8",
                ],
            )?;
        }
        if let Some(settings) = settings {
            cluster.write_settings(settings)?;
        }
        if cluster.is_running() {
            tracing::info!(data_dir = %cluster.data_dir.display(), "reusing private PostgreSQL cluster that is already running; it is left running at exit");
            if settings.is_some()
                && let Err(error) =
                    cluster.run("pg_ctl", &["-D", path_str(&cluster.data_dir), "reload"])
            {
                tracing::warn!(%error, "cannot reload the private cluster's settings");
            }
        } else {
            cluster.started_here = true;
            let options = format!(
                "-c listen_addresses='' -c unix_socket_directories='{}' -c max_connections=100",
                cluster.socket_dir.display()
            );
            let log_file = cluster.data_dir.join("postgres.log");
            cluster.run(
                "pg_ctl",
                &[
                    "-D",
                    path_str(&cluster.data_dir),
                    "-l",
                    path_str(&log_file),
                    "-o",
                    &options,
                    "-w",
                    "-t",
                    "60",
                    "start",
                ],
            )?;
            tracing::info!(socket_dir = %cluster.socket_dir.display(), "private PostgreSQL cluster started");
        }
        Ok(cluster)
    }

    /// Where the cluster of `root` lives (`root/postgres`, or a directory under
    /// /var/lib/sluice when the `postgres` user cannot reach `root`), without touching it.
    pub fn locate(root: &Path) -> Result<Self, EmbeddedError> {
        let bin_dir = find_bin_dir().ok_or(EmbeddedError::BinariesNotFound)?;
        let root = absolute(root)?;
        if root.to_str().is_none() {
            let source = std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "data directory path must be UTF-8",
            );
            return Err(EmbeddedError::Io { path: root, source });
        }
        let run_as = if nix::unistd::geteuid().is_root() {
            Some(
                nix::unistd::User::from_name("postgres")
                    .ok()
                    .flatten()
                    .ok_or(EmbeddedError::NoPostgresUser)?,
            )
        } else {
            None
        };
        // As root, the cluster runs as `postgres`, which must be able to reach its directory.
        // Under a private home (e.g. /root/sluice, mode 0700) it cannot: keep the cluster in a
        // directory of its own under /var/lib/sluice instead, and say so.
        let root = match &run_as {
            // An existing cluster stays where it is.
            Some(user)
                if !root.join("postgres/PG_VERSION").exists()
                    // `root` itself is made searchable in `prepare_dirs`; its parents must be.
                    && !is_reachable_by(&root, user) =>
            {
                let fallback = fallback_root(&root);
                tracing::warn!(
                    data_dir = %root.display(),
                    cluster_dir = %fallback.display(),
                    "the postgres user cannot reach the data directory; keeping the private cluster elsewhere"
                );
                fallback
            }
            _ => root,
        };
        Ok(Self {
            bin_dir,
            data_dir: root.join("postgres"),
            socket_dir: socket_dir_for(&root),
            root,
            run_as,
            started_here: false,
        })
    }

    /// The cluster's data directory.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The directory of its unix socket.
    pub fn socket_dir(&self) -> &Path {
        &self.socket_dir
    }

    /// The path of a PostgreSQL program (`pg_basebackup`, …).
    pub fn program(&self, name: &str) -> PathBuf {
        self.bin_dir.join(name)
    }

    /// Gives `path` (and everything under it) to the user PostgreSQL runs as, when sluice runs
    /// as root: restored files, a backup directory the archiver writes to.
    pub fn give_to_postgres(&self, path: &Path) -> Result<(), EmbeddedError> {
        let Some(user) = &self.run_as else {
            return Ok(());
        };
        let io_error = |source| EmbeddedError::Io {
            path: path.to_owned(),
            source,
        };
        std::os::unix::fs::lchown(path, Some(user.uid.as_raw()), Some(user.gid.as_raw()))
            .map_err(io_error)?;
        if fs::symlink_metadata(path).map_err(io_error)?.is_dir() {
            for entry in fs::read_dir(path).map_err(io_error)? {
                self.give_to_postgres(&entry.map_err(io_error)?.path())?;
            }
        }
        Ok(())
    }

    /// Writes `settings` to `sluice.conf` and makes `postgresql.conf` include it.
    fn write_settings(&self, settings: &[(&str, String)]) -> Result<(), EmbeddedError> {
        let io_error = |path: &Path| {
            let path = path.to_owned();
            move |source| EmbeddedError::Io { path, source }
        };
        let main = self.data_dir.join("postgresql.conf");
        let text = fs::read_to_string(&main).map_err(io_error(&main))?;
        if !text.lines().any(|line| line.trim() == INCLUDE_LINE) {
            let mut file = fs::OpenOptions::new()
                .append(true)
                .open(&main)
                .map_err(io_error(&main))?;
            std::io::Write::write_all(&mut file, format!("\n{INCLUDE_LINE}\n").as_bytes())
                .map_err(io_error(&main))?;
        }
        let mut conf = String::from("# Written by sluice at each start: edits are lost.\n");
        for (name, value) in settings {
            conf.push_str(&format!("{name} = '{}'\n", value.replace('\'', "''")));
        }
        let path = self.data_dir.join(SETTINGS_FILE);
        fs::write(&path, conf).map_err(io_error(&path))?;
        self.give_to_postgres(&path)
    }

    /// Creates the sluice database if missing. Needs the cluster running.
    pub async fn ensure_database(&self) -> Result<(), sqlx::Error> {
        use sqlx::{ConnectOptions, Connection};
        let mut connection = self
            .connect_options()
            .database("postgres")
            .connect()
            .await?;
        let exists: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
                .bind(ROLE)
                .fetch_one(&mut connection)
                .await?;
        if !exists {
            sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {ROLE}")))
                .execute(&mut connection)
                .await?;
        }
        connection.close().await
    }

    /// Connection options for the sluice database over the unix socket.
    pub fn connect_options(&self) -> PgConnectOptions {
        PgConnectOptions::new()
            .socket(&self.socket_dir)
            .username(ROLE)
            .database(ROLE)
    }

    /// A URL for the sluice database over the unix socket (for `DATABASE_URL` and tools).
    pub fn url(&self) -> String {
        format!(
            "postgres://{ROLE}@localhost/{ROLE}?host={}",
            self.socket_dir.display()
        )
    }

    /// Whether this process started the cluster. Only then is it stopped at exit: one found
    /// running belongs to whoever started it (a server, while `sluice lifecycle --once` runs
    /// beside it), or was left by a crash.
    pub fn started_here(&self) -> bool {
        self.started_here
    }

    /// Stops the cluster (fast shutdown: open transactions are rolled back, data is safe).
    pub fn stop(&self) -> Result<(), EmbeddedError> {
        self.run(
            "pg_ctl",
            &["-D", path_str(&self.data_dir), "-m", "fast", "-w", "stop"],
        )?;
        tracing::info!("private PostgreSQL cluster stopped");
        Ok(())
    }

    /// Whether a postmaster runs on the data directory (`pg_ctl status`).
    pub fn is_running(&self) -> bool {
        self.output("pg_ctl", &["-D", path_str(&self.data_dir), "status"])
            .is_ok_and(|output| output.status.success())
    }

    fn prepare_dirs(&self) -> Result<(), EmbeddedError> {
        let root = self.root.as_path();
        for dir in [root, self.data_dir.as_path(), self.socket_dir.as_path()] {
            fs::create_dir_all(dir).map_err(|source| EmbeddedError::Io {
                path: dir.to_owned(),
                source,
            })?;
        }
        if self.run_as.is_some() {
            // The postgres user must be able to pass through the directories sluice made for
            // it, whatever the umask (searchable, not listable).
            for dir in [
                Some(root),
                root.parent()
                    .filter(|parent| parent.starts_with(FALLBACK_BASE)),
            ]
            .into_iter()
            .flatten()
            {
                let metadata = fs::metadata(dir).map_err(|source| EmbeddedError::Io {
                    path: dir.to_owned(),
                    source,
                })?;
                let mode = metadata.permissions().mode() | 0o011;
                fs::set_permissions(dir, fs::Permissions::from_mode(mode)).map_err(|source| {
                    EmbeddedError::Io {
                        path: dir.to_owned(),
                        source,
                    }
                })?;
            }
        }
        for dir in [&self.data_dir, &self.socket_dir] {
            let io_error = |source| EmbeddedError::Io {
                path: dir.clone(),
                source,
            };
            fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(io_error)?;
            if let Some(user) = &self.run_as {
                std::os::unix::fs::chown(dir, Some(user.uid.as_raw()), Some(user.gid.as_raw()))
                    .map_err(io_error)?;
            }
        }
        Ok(())
    }

    fn run(&self, program: &str, args: &[&str]) -> Result<(), EmbeddedError> {
        let output = self.output(program, args)?;
        if output.status.success() {
            return Ok(());
        }
        let stderr = String::from_utf8_lossy(&output.stderr);
        let stdout = String::from_utf8_lossy(&output.stdout);
        Err(EmbeddedError::Command {
            command: program.to_owned(),
            detail: format!("{} {}", stderr.trim(), stdout.trim())
                .trim()
                .to_owned(),
        })
    }

    fn output(&self, program: &str, args: &[&str]) -> Result<Output, EmbeddedError> {
        let mut command = Command::new(self.bin_dir.join(program));
        command
            .args(args)
            .env("LC_ALL", "C.UTF-8")
            .current_dir(&self.data_dir);
        if let Some(user) = &self.run_as {
            command
                .uid(user.uid.as_raw())
                .gid(user.gid.as_raw())
                .env("HOME", &user.dir);
        }
        command.output().map_err(|source| EmbeddedError::Command {
            command: program.to_owned(),
            detail: source.to_string(),
        })
    }
}

/// Whether `user` can search every existing ancestor of `dir` (PostgreSQL, run as that user,
/// must open its own data directory).
fn is_reachable_by(dir: &Path, user: &nix::unistd::User) -> bool {
    use std::os::unix::fs::MetadataExt;
    dir.ancestors()
        .skip(1)
        .filter_map(|ancestor| fs::metadata(ancestor).ok())
        .all(|metadata| {
            let mode = metadata.mode();
            if metadata.uid() == user.uid.as_raw() {
                mode & 0o100 != 0
            } else if metadata.gid() == user.gid.as_raw() {
                mode & 0o010 != 0
            } else {
                mode & 0o001 != 0
            }
        })
}

/// Where clusters go when the postgres user cannot reach the data directory: one directory
/// per data directory path under here.
const FALLBACK_BASE: &str = "/var/lib/sluice";

fn fallback_root(root: &Path) -> PathBuf {
    PathBuf::from(FALLBACK_BASE).join(format!("cluster-{:08x}", path_checksum(root)))
}

/// A stable checksum of a path (the same across builds and toolchains).
fn path_checksum(path: &Path) -> u32 {
    crc32c::crc32c(path.as_os_str().as_encoded_bytes())
}

/// The directory with `initdb`, `pg_ctl` and `postgres` (and `pg_basebackup`): from PATH
/// (links followed), `pg_config --bindir`, or the newest `/usr/lib/postgresql/*/bin`.
pub fn find_bin_dir() -> Option<PathBuf> {
    let has_server = |dir: &Path| {
        ["initdb", "pg_ctl", "postgres"]
            .iter()
            .all(|tool| dir.join(tool).is_file())
    };
    let from_path = std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .find(|dir| has_server(dir))
        // A directory of links (/usr/local/bin) may lack the other tools (pg_basebackup):
        // take the directory the server binaries really are in.
        .map(|dir| {
            fs::canonicalize(dir.join("initdb"))
                .ok()
                .and_then(|initdb| initdb.parent().map(Path::to_path_buf))
                .filter(|real| has_server(real))
                .unwrap_or(dir)
        });
    if from_path.is_some() {
        return from_path;
    }
    let from_pg_config = Command::new("pg_config")
        .arg("--bindir")
        .output()
        .ok()
        .filter(|output| output.status.success())
        .map(|output| PathBuf::from(String::from_utf8_lossy(&output.stdout).trim()))
        .filter(|dir| has_server(dir));
    if from_pg_config.is_some() {
        return from_pg_config;
    }
    let mut versions: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let version = entry.file_name().to_string_lossy().parse::<u32>().ok()?;
            Some((version, entry.path().join("bin")))
        })
        .filter(|(_, dir)| has_server(dir))
        .collect();
    versions.sort();
    versions.pop().map(|(_, dir)| dir)
}

fn socket_dir_for(root: &Path) -> PathBuf {
    let preferred = root.join("run");
    if preferred.as_os_str().len() <= MAX_SOCKET_DIR_LEN {
        return preferred;
    }
    std::env::temp_dir().join(format!("sluice-pg-{:08x}", path_checksum(root)))
}

fn absolute(path: &Path) -> Result<PathBuf, EmbeddedError> {
    std::path::absolute(path).map_err(|source| EmbeddedError::Io {
        path: path.to_owned(),
        source,
    })
}

/// Paths under the data directory, which `start` checked to be UTF-8.
fn path_str(path: &Path) -> &str {
    path.to_str().unwrap_or_default()
}

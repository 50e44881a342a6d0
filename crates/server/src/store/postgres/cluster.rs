//! A throwaway PostgreSQL cluster for tests and benchmarks: `initdb` into a fresh temporary
//! directory, `postgres` on a free loopback port, stopped and deleted when dropped. It uses the
//! PostgreSQL server binaries on `PATH`; when they are missing it says how to install them,
//! instead of letting a test pass without a database. PostgreSQL refuses to run as root, so a
//! root process runs it as the `postgres` user (`runuser`), the way these machines are set up.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// A running cluster; stopped (immediately) and deleted on drop.
pub struct TestCluster {
    dir: tempfile::TempDir,
    port: u16,
    as_postgres_user: bool,
}

/// How to get PostgreSQL, for the messages of a missing or failing cluster.
const HOW_TO_INSTALL: &str = "install the PostgreSQL server (Debian: `apt-get install \
     postgresql`, then put /usr/lib/postgresql/<version>/bin on PATH) so that initdb, pg_ctl \
     and postgres are on PATH";

impl TestCluster {
    /// Starts a cluster with PostgreSQL's default durability (`fsync`, `synchronous_commit`
    /// on): what benchmarks measure.
    pub fn start_durable() -> Result<TestCluster, String> {
        Self::start_with(&[])
    }

    /// Starts a cluster for tests: durability off (`fsync=off`), which tests of behaviour do not
    /// need and which makes them several times faster.
    pub fn start() -> Result<TestCluster, String> {
        Self::start_with(&["-c", "fsync=off", "-c", "synchronous_commit=off"])
    }

    /// Starts a test cluster (as [`TestCluster::start`]) with more server settings, each a
    /// `-c name=value` pair's value: `&["shared_preload_libraries=pg_stat_statements"]`.
    pub fn start_with_settings(extra: &[&str]) -> Result<TestCluster, String> {
        let mut settings = vec!["-c", "fsync=off", "-c", "synchronous_commit=off"];
        for setting in extra {
            settings.extend(["-c", setting]);
        }
        Self::start_with(&settings)
    }

    fn start_with(settings: &[&str]) -> Result<TestCluster, String> {
        for tool in ["initdb", "pg_ctl", "postgres"] {
            if find_on_path(tool).is_none() {
                return Err(format!(
                    "PostgreSQL's {tool} is not on PATH: {HOW_TO_INSTALL}"
                ));
            }
        }
        let as_postgres_user = running_as_root();
        let mut builder = tempfile::Builder::new();
        builder.prefix("tether-pg-");
        // The postgres user must reach the directory: under root's own TMPDIR it may not.
        let dir = if as_postgres_user {
            builder.tempdir_in("/tmp")
        } else {
            builder.tempdir()
        }
        .map_err(|e| format!("could not make a directory for PostgreSQL: {e}"))?;
        if as_postgres_user {
            // The cluster's files must belong to the user that runs it.
            run(
                Command::new("chown")
                    .args(["-R", "postgres:"])
                    .arg(dir.path()),
                "chown the cluster's directory to the postgres user",
            )?;
        }
        let data = dir.path().join("data");
        let cluster = TestCluster {
            dir,
            port: free_port()?,
            as_postgres_user,
        };
        cluster.pg(
            "initdb",
            &[
                "-D",
                path_str(&data)?,
                "-U",
                "postgres",
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C",
                "--no-sync",
            ],
        )?;
        let mut options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1",
            cluster.port,
            path_str(cluster.dir.path())?
        );
        for setting in settings {
            options.push(' ');
            options.push_str(setting);
        }
        let log = cluster.dir.path().join("postgres.log");
        cluster.pg(
            "pg_ctl",
            &[
                "-D",
                path_str(&data)?,
                "-l",
                path_str(&log)?,
                "-o",
                &options,
                "-w",
                "-t",
                "60",
                "start",
            ],
        )?;
        Ok(cluster)
    }

    /// Makes sure the cluster stops when this process ends, however it ends (a cluster kept in
    /// a `static` is never dropped): a small shell process waits for this one to be gone, then
    /// stops the cluster and deletes its directory.
    pub fn stop_when_this_process_exits(&self) -> Result<(), String> {
        let data = self.dir.path().join("data");
        let runuser = if self.as_postgres_user {
            "runuser -u postgres -- "
        } else {
            ""
        };
        let script = format!(
            "while kill -0 {pid} 2>/dev/null; do sleep 0.5; done; \
             {runuser}pg_ctl -D '{data}' -m immediate -w stop >/dev/null 2>&1; rm -rf '{dir}'",
            pid = std::process::id(),
            data = path_str(&data)?,
            dir = path_str(self.dir.path())?,
        );
        Command::new("sh")
            .args(["-c", &script])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .map(|_| ())
            .map_err(|e| format!("could not start the cluster's watchdog: {e}"))
    }

    /// The port it listens on (127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// A connection URL for `database`.
    pub fn url(&self, database: &str) -> String {
        format!(
            "postgres://postgres@127.0.0.1:{}/{database}?connect_timeout=10",
            self.port
        )
    }

    /// Creates a database and returns its URL: each test gets its own, on one cluster.
    pub async fn create_database(&self, name: &str) -> Result<String, String> {
        let (client, connection) =
            tokio_postgres::connect(&self.url("postgres"), tokio_postgres::NoTls)
                .await
                .map_err(|e| format!("could not connect to the test cluster: {e}"))?;
        let driver = tokio::spawn(connection);
        let created = client
            .batch_execute(&format!("CREATE DATABASE \"{name}\""))
            .await
            .map_err(|e| format!("could not create database {name}: {e}"));
        drop(client);
        let _ = driver.await;
        created.map(|_| self.url(name))
    }

    /// Runs one PostgreSQL program, as the postgres user when this process is root.
    fn pg(&self, program: &str, args: &[&str]) -> Result<Output, String> {
        let mut command = if self.as_postgres_user {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--", program]);
            c
        } else {
            Command::new(program)
        };
        command.args(args);
        run(&mut command, program).map_err(|e| {
            let log =
                std::fs::read_to_string(self.dir.path().join("postgres.log")).unwrap_or_default();
            format!("{e}\nserver log:\n{log}")
        })
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        let data = self.dir.path().join("data");
        if let Some(data) = data.to_str() {
            let _ = self.pg("pg_ctl", &["-D", data, "-m", "immediate", "-w", "stop"]);
        }
    }
}

fn run(command: &mut Command, what: &str) -> Result<Output, String> {
    let output = command
        .output()
        .map_err(|e| format!("could not run {what}: {e}; {HOW_TO_INSTALL}"))?;
    if output.status.success() {
        Ok(output)
    } else {
        Err(format!(
            "{what} failed ({}): {}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ))
    }
}

fn find_on_path(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(program))
            .find(|candidate| candidate.is_file())
    })
}

fn running_as_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// A port nobody listens on now (the cluster takes it a moment later; a clash fails loudly).
fn free_port() -> Result<u16, String> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("no free loopback port: {e}"))
}

fn path_str(path: &Path) -> Result<&str, String> {
    path.to_str()
        .ok_or_else(|| format!("{} is not valid UTF-8", path.display()))
}

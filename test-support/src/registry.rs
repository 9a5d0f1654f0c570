//! A container registry for the end-to-end tests and the benchmarks: Debian's
//! `docker-registry` (distribution 2.8) serving plain HTTP on 127.0.0.1, its storage in a
//! folder of the caller's, stopped when dropped.

use std::fs;
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Debian's registry.
pub const REGISTRY: &str = "/usr/bin/docker-registry";

/// A private registry.
#[derive(Debug)]
pub struct Registry {
    child: Child,
    port: u16,
}

/// Whether Debian's docker-registry is installed; the problem when not.
pub fn missing() -> Option<String> {
    (!Path::new(REGISTRY).exists())
        .then(|| format!("{REGISTRY} not installed (Debian's docker-registry)"))
}

impl Registry {
    /// Starts a registry keeping its images in `dir`, on a free port of 127.0.0.1; waits until
    /// it answers.
    ///
    /// # Panics
    ///
    /// When it does not start or answer within 30 s.
    pub fn start(dir: &Path) -> Registry {
        fs::create_dir_all(dir.join("storage")).expect("registry folder");
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let config = dir.join("config.yml");
        fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:{port}\n",
                dir.join("storage").display()
            ),
        )
        .expect("registry configuration");
        let log = fs::File::create(dir.join("registry.log")).expect("registry log");
        let child = Command::new(REGISTRY)
            .arg("serve")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start docker-registry");
        let registry = Registry { child, port };
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "docker-registry did not listen within 30 s: {}",
                fs::read_to_string(dir.join("registry.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        registry
    }

    /// `127.0.0.1:PORT`, the registry's part of an image reference.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

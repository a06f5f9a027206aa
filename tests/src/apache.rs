//! A real Apache httpd (Debian's `apache2`, with `libapache2-mod-jk`; both installed by
//! `cargo xtask setup`) as the web tier in front of AJP: a private ServerRoot in the temp
//! directory holding its config, PID file, logs and mutexes, only the modules it needs loaded by
//! explicit `LoadModule` lines, run in the foreground inside a namespace and stopped by its PID.
//!
//! ```text
//! let conf = ApacheConf::new(listen, Front::ProxyAjp { target: vip, secret: None, ping: false });
//! let apache = Apache::start(web.ns(), "ajp", &conf)?;   // serves http://listen/ → ajp://vip/
//! ```
//!
//! `ip netns exec` execs `apache2`, so the [`Child`]'s PID is Apache's parent process; SIGTERM to
//! it stops the workers too.

use std::fmt::Write as _;
use std::fs;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use crate::child::Child;
use crate::client::connect_from;
use crate::netns::Netns;
use crate::unique_prefix;

/// Debian's apache2 binary.
pub const APACHE_BIN: &str = "/usr/sbin/apache2";
/// Where Debian keeps the loadable modules.
pub const MODULES_DIR: &str = "/usr/lib/apache2/modules";
/// How long [`Apache::start`] waits for the listener.
pub const START_TIMEOUT: Duration = Duration::from_secs(15);

/// What Apache forwards `/` to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Front {
    /// `mod_proxy_ajp`: `ProxyPass / ajp://target/` (with `secret=` when set, and `ping=` (a CPing
    /// before every request) when `ping`).
    ProxyAjp {
        target: SocketAddr,
        secret: Option<String>,
        ping: bool,
    },
    /// `mod_proxy_balancer` over `mod_proxy_ajp`: one `BalancerMember … route=R` per
    /// `(route, address)`, sticky on `JSESSIONID|jsessionid`, by requests otherwise.
    Balancer {
        members: Vec<(String, SocketAddr)>,
        secret: Option<String>,
    },
    /// `mod_jk`: one `ajp13` worker to `target` (`secret` when set, `ping_mode=A` when `ping`),
    /// `JkMount /*`.
    ModJk {
        target: SocketAddr,
        secret: Option<String>,
        ping: bool,
    },
}

/// The whole configuration of a test Apache.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApacheConf {
    /// `Listen` address.
    pub listen: SocketAddr,
    pub front: Front,
    /// Worker processes (event MPM), each with [`ApacheConf::threads`] threads.
    pub processes: u32,
    pub threads: u32,
}

impl ApacheConf {
    /// `front` on `listen` with 2 processes of 32 threads.
    pub fn new(listen: SocketAddr, front: Front) -> ApacheConf {
        ApacheConf {
            listen,
            front,
            processes: 2,
            threads: 32,
        }
    }

    /// The modules `front` needs (besides the MPM).
    fn modules(&self) -> Vec<&'static str> {
        let mut m = vec!["authz_core"];
        match self.front {
            Front::ProxyAjp { .. } => m.extend(["proxy", "proxy_ajp"]),
            Front::Balancer { .. } => m.extend([
                "proxy",
                "proxy_ajp",
                "proxy_balancer",
                "slotmem_shm",
                "lbmethod_byrequests",
            ]),
            Front::ModJk { .. } => m.push("jk"),
        }
        m
    }

    /// `httpd.conf` for a ServerRoot `root`.
    pub fn httpd_conf(&self, root: &Path) -> String {
        let r = root.display();
        let mut c = String::new();
        let _ = writeln!(
            c,
            "# lb integration tests: a private Apache (see tests/src/apache.rs)."
        );
        let _ = writeln!(c, "ServerRoot \"{r}\"");
        let _ = writeln!(c, "ServerName lb-tests.invalid");
        let _ = writeln!(c, "Listen {}", self.listen);
        let _ = writeln!(c, "PidFile \"{r}/httpd.pid\"");
        let _ = writeln!(c, "ErrorLog \"{r}/error.log\"");
        let _ = writeln!(c, "LogLevel warn");
        let _ = writeln!(c, "DefaultRuntimeDir \"{r}\"");
        let _ = writeln!(c, "Mutex file:{r} default");
        let _ = writeln!(c, "User www-data\nGroup www-data");
        let _ = writeln!(c, "KeepAlive On\nMaxKeepAliveRequests 0\nTimeout 30");
        let _ = writeln!(c, "LoadModule mpm_event_module {MODULES_DIR}/mod_mpm_event.so");
        let _ = writeln!(
            c,
            "ServerLimit {p}\nStartServers {p}\nThreadLimit {t}\nThreadsPerChild {t}\n\
             MaxRequestWorkers {w}\nMinSpareThreads 1\nMaxSpareThreads {w}\nMaxConnectionsPerChild 0",
            p = self.processes,
            t = self.threads,
            w = self.processes * self.threads
        );
        for m in self.modules() {
            let _ = writeln!(c, "LoadModule {m}_module {MODULES_DIR}/mod_{m}.so");
        }
        let secret = |s: &Option<String>| match s {
            Some(s) => format!(" secret={s}"),
            None => String::new(),
        };
        match &self.front {
            Front::ProxyAjp {
                target,
                secret: sec,
                ping,
            } => {
                let ping = if *ping { " ping=2" } else { "" };
                let _ = writeln!(c, "ProxyPass / ajp://{target}/{}{ping}", secret(sec));
            }
            Front::Balancer { members, secret: sec } => {
                let _ = writeln!(c, "<Proxy \"balancer://tomcats\">");
                for (route, addr) in members {
                    let _ = writeln!(c, "  BalancerMember ajp://{addr} route={route}{}", secret(sec));
                }
                let _ = writeln!(
                    c,
                    "  ProxySet lbmethod=byrequests stickysession=JSESSIONID|jsessionid"
                );
                let _ = writeln!(c, "</Proxy>");
                let _ = writeln!(
                    c,
                    "ProxyPass / balancer://tomcats/ stickysession=JSESSIONID|jsessionid"
                );
            }
            Front::ModJk { .. } => {
                let _ = writeln!(c, "JkWorkersFile \"{r}/workers.properties\"");
                let _ = writeln!(c, "JkShmFile \"{r}/jk.shm\"");
                let _ = writeln!(c, "JkLogFile \"{r}/mod_jk.log\"");
                let _ = writeln!(c, "JkLogLevel info");
                let _ = writeln!(c, "JkMount /* tomcat");
            }
        }
        c
    }

    /// mod_jk's `workers.properties` (only for [`Front::ModJk`]).
    pub fn workers_properties(&self) -> Option<String> {
        let Front::ModJk { target, secret, ping } = &self.front else {
            return None;
        };
        let mut w = String::new();
        let _ = writeln!(w, "worker.list=tomcat");
        let _ = writeln!(w, "worker.tomcat.type=ajp13");
        let _ = writeln!(w, "worker.tomcat.host={}", target.ip());
        let _ = writeln!(w, "worker.tomcat.port={}", target.port());
        if let Some(s) = secret {
            let _ = writeln!(w, "worker.tomcat.secret={s}");
        }
        if *ping {
            let _ = writeln!(w, "worker.tomcat.ping_mode=A");
            let _ = writeln!(w, "worker.tomcat.ping_timeout=2000");
        }
        Some(w)
    }
}

/// Checks that Apache and the modules the tests use are installed.
pub fn check_installed() -> Result<(), String> {
    let mut missing = Vec::new();
    if !Path::new(APACHE_BIN).is_file() {
        missing.push(APACHE_BIN.to_string());
    }
    for m in [
        "mpm_event",
        "authz_core",
        "proxy",
        "proxy_ajp",
        "proxy_balancer",
        "slotmem_shm",
        "lbmethod_byrequests",
        "jk",
    ] {
        let p = Path::new(MODULES_DIR).join(format!("mod_{m}.so"));
        if !p.is_file() {
            missing.push(p.display().to_string());
        }
    }
    if missing.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "Apache httpd is not installed (missing: {}); run `cargo xtask setup` (it installs the \
             Debian packages apache2 and libapache2-mod-jk)",
            missing.join(", ")
        ))
    }
}

/// A running Apache (`apache2 -f CONF -DFOREGROUND`), stopped with SIGTERM on drop; its ServerRoot
/// is removed afterwards.
#[derive(Debug)]
pub struct Apache {
    child: Child,
    root: PathBuf,
    listen: SocketAddr,
}

impl Apache {
    /// Write the config into `<tmp>/<unique_prefix(tag)>-httpd`, start Apache inside `ns` and wait
    /// until `conf.listen` accepts connections (from inside `ns`).
    pub fn start(ns: &Netns, tag: &str, conf: &ApacheConf) -> io::Result<Apache> {
        check_installed().map_err(io::Error::other)?;
        let root = std::env::temp_dir().join(format!("{}-httpd", unique_prefix(tag)));
        if root.exists() {
            fs::remove_dir_all(&root)?;
        }
        fs::create_dir_all(&root)?;
        // The workers (www-data) only need to traverse it; the parent (root) writes the files.
        fs::set_permissions(&root, fs::Permissions::from_mode(0o755))?;
        let conf_path = root.join("httpd.conf");
        fs::write(&conf_path, conf.httpd_conf(&root))?;
        if let Some(w) = conf.workers_properties() {
            fs::write(root.join("workers.properties"), w)?;
        }
        let mut cmd = ns.command(APACHE_BIN, &["-f", conf_path.to_str().unwrap(), "-DFOREGROUND"]);
        cmd.env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("LANG", "C")
            .current_dir(&root);
        let child = Child::spawn(cmd)?;
        let mut apache = Apache {
            child,
            root,
            listen: conf.listen,
        };
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = apache.child.try_wait()? {
                return Err(io::Error::other(format!(
                    "apache2 exited ({status}) at start\n--- stderr ---\n{}\n--- error.log ---\n{}",
                    apache.child.stderr_text(),
                    apache.error_log()
                )));
            }
            let ip = match conf.listen.ip() {
                std::net::IpAddr::V4(a) => a,
                std::net::IpAddr::V6(_) => Ipv4Addr::UNSPECIFIED,
            };
            if connect_from(ns.name(), ip, conf.listen, Duration::from_secs(1)).is_ok() {
                return Ok(apache);
            }
            if Instant::now() > deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "apache2 did not listen on {} within {START_TIMEOUT:?}\n--- error.log ---\n{}",
                        conf.listen,
                        apache.error_log()
                    ),
                ));
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Apache's parent PID.
    pub fn pid(&self) -> u32 {
        self.child.pid()
    }

    /// The listen address.
    pub fn listen(&self) -> SocketAddr {
        self.listen
    }

    /// The ServerRoot (config, logs).
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// True while Apache's parent runs.
    pub fn is_running(&mut self) -> bool {
        self.child.is_running()
    }

    /// Apache's `error.log` (and mod_jk's log, when there is one).
    pub fn error_log(&self) -> String {
        let mut s = fs::read_to_string(self.root.join("error.log")).unwrap_or_default();
        if let Ok(jk) = fs::read_to_string(self.root.join("mod_jk.log")) {
            s.push_str("--- mod_jk.log ---\n");
            s.push_str(&jk);
        }
        s
    }

    /// SIGTERM to the parent (it stops its workers) and wait for it.
    pub fn stop(&mut self) -> io::Result<()> {
        self.child.stop().map(|_| ())
    }
}

impl Drop for Apache {
    fn drop(&mut self) {
        let _ = self.child.stop();
        let _ = fs::remove_dir_all(&self.root);
    }
}

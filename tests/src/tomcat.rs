//! A real Tomcat 10 (Debian's `tomcat10` package, installed by `cargo xtask setup`) as a test
//! backend: a private `CATALINA_BASE` per test with only an AJP/1.3 connector, run in the
//! foreground inside a backend namespace and stopped by its Java PID.
//!
//! ```text
//! let base = CatalinaBase::new("tcup", topo.backend_addr(1), 8009)?;
//! let mut tomcat = Tomcat::start(topo.backend_ns(1), &base)?;   // java runs in <prefix>-b1
//! tomcat.wait_cping(topo.lb_ns().name(), addr, Duration::from_secs(60))?;
//! ```
//!
//! `catalina.sh run` ends in `exec java …` and `ip netns exec` execs too, so the spawned
//! [`Child`]'s PID is the JVM's; [`Tomcat::start`] checks that (`/proc/PID/exe` is a `java`) so
//! that SIGTERM and the drop-time kill reach the JVM itself, never just a wrapper shell.

use std::fs;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::thread;
use std::time::{Duration, Instant};

use crate::child::Child;
use crate::client::ajp_cping_from;
use crate::netns::Netns;
use crate::{AJP_CPONG, unique_prefix};

/// Where Debian's `tomcat10` package puts `CATALINA_HOME`.
pub const CATALINA_HOME: &str = "/usr/share/tomcat10";
/// The package's pristine configuration (`web.xml`, `catalina.properties`, `logging.properties`).
const CONF_SOURCES: [&str; 2] = ["/usr/share/tomcat10/etc", "/etc/tomcat10"];
/// Heap and JIT settings that keep a test Tomcat small and quick to start on a 2-core machine.
pub const JAVA_OPTS: &str = "-Xmx128m -Xms32m -XX:+UseSerialGC -XX:TieredStopAtLevel=1";
/// How long [`Tomcat::stop`] and drop wait after SIGTERM before SIGKILL.
pub const STOP_GRACE: Duration = Duration::from_secs(15);

/// Checks that Tomcat 10 and a `java` are installed; the error says what is missing and how to
/// install it.
pub fn check_installed() -> Result<(), String> {
    let home = Path::new(CATALINA_HOME);
    let mut missing = Vec::new();
    for f in [
        "bin/catalina.sh",
        "bin/bootstrap.jar",
        "bin/tomcat-juli.jar",
        "lib/catalina.jar",
    ] {
        if !home.join(f).is_file() {
            missing.push(home.join(f).display().to_string());
        }
    }
    if conf_source("web.xml").is_none() {
        missing.push("web.xml (in /usr/share/tomcat10/etc or /etc/tomcat10)".into());
    }
    let java = Command::new("java")
        .arg("-version")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status();
    if !matches!(java, Ok(s) if s.success()) {
        missing.push("java (a JRE >= 11 on PATH)".into());
    }
    if missing.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "Tomcat 10 is not installed (missing: {}); run `cargo xtask setup` (it installs the \
             Debian packages tomcat10 and a JRE)",
            missing.join(", ")
        ))
    }
}

fn conf_source(file: &str) -> Option<PathBuf> {
    CONF_SOURCES
        .iter()
        .map(|d| Path::new(d).join(file))
        .find(|p| p.is_file())
}

/// How a test Tomcat is set up beyond its AJP address: the Engine's `jvmRoute`, the AJP connector's
/// secret and thread count, and whether it serves the session-printing [`INDEX_JSP`] as `ROOT`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TomcatOptions {
    /// `jvmRoute` on the Engine: Tomcat appends `.ROUTE` to every session id it creates.
    pub jvm_route: Option<String>,
    /// The AJP connector's `secret` (then `secretRequired="true"`); `None`: no secret required.
    pub secret: Option<String>,
    /// The AJP connector's `maxThreads` (16 when 0).
    pub max_threads: u32,
    /// Deploy `webapps/ROOT/index.jsp` ([`INDEX_JSP`]).
    pub webapp: bool,
    /// Log every request (`%r %s`, unbuffered) to `logs/access.*.log`, refused ones included
    /// (Tomcat logs the 403 of a wrong secret or a forbidden attribute too): proof of what reached
    /// this Tomcat. See [`CatalinaBase::access_log`].
    pub access_log: bool,
}

impl TomcatOptions {
    /// An application server: `jvmRoute = route`, the JSP deployed, no secret, 16 threads.
    pub fn app(route: &str) -> TomcatOptions {
        TomcatOptions {
            jvm_route: Some(route.to_string()),
            webapp: true,
            ..TomcatOptions::default()
        }
    }

    /// The same with the AJP connector requiring `secret`.
    pub fn with_secret(mut self, secret: Option<&str>) -> TomcatOptions {
        self.secret = secret.map(String::from);
        self
    }

    /// The same with the access log on or off.
    pub fn with_access_log(mut self, on: bool) -> TomcatOptions {
        self.access_log = on;
        self
    }

    /// The same with `maxThreads = n`.
    pub fn with_threads(mut self, n: u32) -> TomcatOptions {
        self.max_threads = n;
        self
    }
}

/// The `ROOT` webapp's only page (Jasper compiles it on first use). It uses an `HttpSession` and
/// answers `text/plain` lines `key=value`:
///
/// ```text
/// route=t1                      the Engine's jvmRoute (read over JMX), "-" when unset
/// session=0A1B….t1              the session id (created on the first request without a cookie)
/// new=true                      whether this request created the session
/// remote=10.0.0.12              request.getRemoteAddr(): the browser's address the AJP request carries
/// method=POST
/// body=2048                     bytes of request body read
/// count=1234                    requests this Tomcat served so far (this one included)
/// ```
///
/// `?sleep=MS` waits MS milliseconds (at most 10 s) after reading the body, to keep a request in
/// flight; `?session=existing` uses the session of the cookie but never creates one (`session=-`
/// when there is none), `?session=none` neither creates nor uses one.
pub const INDEX_JSP: &str = r#"<%@ page contentType="text/plain; charset=UTF-8" session="false" %><%
Object route = application.getAttribute("lbtest.route");
if (route == null) {
    try {
        route = java.lang.management.ManagementFactory.getPlatformMBeanServer()
            .getAttribute(new javax.management.ObjectName("Catalina:type=Engine"), "jvmRoute");
    } catch (Exception e) {
        route = null;
    }
    if (route == null) { route = "-"; }
    application.setAttribute("lbtest.route", route);
}
java.util.concurrent.atomic.AtomicLong counter =
    (java.util.concurrent.atomic.AtomicLong) application.getAttribute("lbtest.count");
if (counter == null) {
    synchronized (application) {
        counter = (java.util.concurrent.atomic.AtomicLong) application.getAttribute("lbtest.count");
        if (counter == null) {
            counter = new java.util.concurrent.atomic.AtomicLong();
            application.setAttribute("lbtest.count", counter);
        }
    }
}
long count = counter.incrementAndGet();
long len = 0;
java.io.InputStream in = request.getInputStream();
byte[] buf = new byte[8192];
int n;
while ((n = in.read(buf)) > 0) { len += n; }
String sleep = request.getParameter("sleep");
if (sleep != null) {
    try { Thread.sleep(Math.min(10000L, Long.parseLong(sleep))); } catch (Exception e) { }
}
String sid = "-";
boolean isNew = false;
String mode = request.getParameter("session");
if (!"none".equals(mode)) {
    jakarta.servlet.http.HttpSession s = request.getSession(!"existing".equals(mode));
    if (s != null) {
        sid = s.getId();
        isNew = s.isNew();
    }
}
%>route=<%= route %>
session=<%= sid %>
new=<%= isNew %>
remote=<%= request.getRemoteAddr() %>
method=<%= request.getMethod() %>
body=<%= len %>
count=<%= count %>
"#;

/// The `conf/server.xml` of a test Tomcat: no shutdown port, one AJP/1.3 connector on
/// `address:ajp_port` (no secret, so a CPing from anywhere is answered), no HTTP connector, an
/// empty `webapps/`.
pub fn server_xml(address: Ipv4Addr, ajp_port: u16) -> String {
    server_xml_with(address, ajp_port, &TomcatOptions::default())
}

/// The `conf/server.xml` for `opts`: like [`server_xml`] plus the Engine's `jvmRoute` and the AJP
/// connector's secret and thread count.
pub fn server_xml_with(address: Ipv4Addr, ajp_port: u16, opts: &TomcatOptions) -> String {
    let secret = match &opts.secret {
        Some(s) => format!(r#"secretRequired="true" secret="{s}""#),
        None => r#"secretRequired="false""#.to_string(),
    };
    let route = match &opts.jvm_route {
        Some(r) => format!(r#" jvmRoute="{r}""#),
        None => String::new(),
    };
    let threads = if opts.max_threads == 0 {
        16
    } else {
        opts.max_threads
    };
    let valve = if opts.access_log {
        "\n        <Valve className=\"org.apache.catalina.valves.AccessLogValve\" directory=\"logs\"\n               \
         prefix=\"access\" suffix=\".log\" pattern=\"%r %s\" buffered=\"false\" />\n      "
    } else {
        ""
    };
    format!(
        r#"<?xml version="1.0" encoding="UTF-8"?>
<!-- lb integration tests: AJP only, no shutdown port (stopped with SIGTERM). -->
<Server port="-1" shutdown="SHUTDOWN">
  <Service name="Catalina">
    <Connector protocol="AJP/1.3" address="{address}" port="{ajp_port}"
               {secret} maxThreads="{threads}" />
    <Engine name="Catalina" defaultHost="localhost"{route}>
      <Host name="localhost" appBase="webapps" unpackWARs="false" autoDeploy="false">{valve}</Host>
    </Engine>
  </Service>
</Server>
"#
    )
}

/// A private `CATALINA_BASE` in the temp directory (`conf/`, `logs/`, `temp/`, `work/`,
/// `webapps/`), removed on drop.
#[derive(Debug)]
pub struct CatalinaBase {
    dir: PathBuf,
    address: Ipv4Addr,
    ajp_port: u16,
}

impl CatalinaBase {
    /// Create `<tmp>/<unique_prefix(tag)>-catalina` with a server.xml for `address:ajp_port` and the
    /// package's web.xml, catalina.properties and logging.properties.
    pub fn new(tag: &str, address: Ipv4Addr, ajp_port: u16) -> io::Result<CatalinaBase> {
        CatalinaBase::with_options(tag, address, ajp_port, &TomcatOptions::default())
    }

    /// Like [`CatalinaBase::new`] with `opts` (jvmRoute, secret, threads, the `ROOT` webapp).
    pub fn with_options(
        tag: &str,
        address: Ipv4Addr,
        ajp_port: u16,
        opts: &TomcatOptions,
    ) -> io::Result<CatalinaBase> {
        check_installed().map_err(io::Error::other)?;
        let dir = std::env::temp_dir().join(format!("{}-catalina", unique_prefix(tag)));
        if dir.exists() {
            fs::remove_dir_all(&dir)?;
        }
        let base = CatalinaBase {
            dir,
            address,
            ajp_port,
        };
        for sub in ["conf", "logs", "temp", "work", "webapps"] {
            fs::create_dir_all(base.dir.join(sub))?;
        }
        fs::write(
            base.dir.join("conf/server.xml"),
            server_xml_with(address, ajp_port, opts),
        )?;
        if opts.webapp {
            let root = base.dir.join("webapps/ROOT");
            fs::create_dir_all(&root)?;
            fs::write(root.join("index.jsp"), INDEX_JSP)?;
        }
        for f in ["web.xml", "catalina.properties", "logging.properties"] {
            if let Some(src) = conf_source(f) {
                fs::copy(&src, base.dir.join("conf").join(f))
                    .map_err(|e| io::Error::new(e.kind(), format!("copying {}: {e}", src.display())))?;
            }
        }
        Ok(base)
    }

    /// The directory (`CATALINA_BASE`).
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// The AJP connector's address.
    pub fn ajp_addr(&self) -> SocketAddr {
        SocketAddr::new(self.address.into(), self.ajp_port)
    }

    /// The access log so far (`GET /index.jsp?x=1 HTTP/1.1 200` lines; empty unless
    /// [`TomcatOptions::access_log`]).
    pub fn access_log(&self) -> String {
        let mut text = String::new();
        if let Ok(rd) = fs::read_dir(self.dir.join("logs")) {
            let mut files: Vec<_> = rd
                .flatten()
                .map(|e| e.path())
                .filter(|p| {
                    p.file_name()
                        .is_some_and(|n| n.to_string_lossy().starts_with("access"))
                })
                .collect();
            files.sort();
            for f in files {
                text.push_str(&fs::read_to_string(&f).unwrap_or_default());
            }
        }
        text
    }

    /// The last `n` lines of Tomcat's `logs/catalina.*.log` files (for failure messages).
    pub fn log_tail(&self, n: usize) -> String {
        let mut lines = Vec::new();
        if let Ok(rd) = fs::read_dir(self.dir.join("logs")) {
            let mut files: Vec<_> = rd.flatten().map(|e| e.path()).collect();
            files.sort();
            for f in files {
                if let Ok(text) = fs::read_to_string(&f) {
                    lines.extend(text.lines().map(String::from));
                }
            }
        }
        lines[lines.len().saturating_sub(n)..].join("\n")
    }
}

impl Drop for CatalinaBase {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// A running Tomcat (`catalina.sh run` in the foreground): the [`Child`] *is* the JVM, stopped
/// with SIGTERM (then SIGKILL after [`STOP_GRACE`]) on drop.
#[derive(Debug)]
pub struct Tomcat {
    child: Child,
    ajp: SocketAddr,
    started: Instant,
}

impl Tomcat {
    /// `CATALINA_HOME=/usr/share/tomcat10 CATALINA_BASE=<base> catalina.sh run` inside `ns`.
    /// Returns once the process has exec'd the JVM (not yet listening: see [`Tomcat::wait_cping`]).
    pub fn start(ns: &Netns, base: &CatalinaBase) -> io::Result<Tomcat> {
        let catalina = Path::new(CATALINA_HOME).join("bin/catalina.sh");
        let mut cmd = ns.command(&catalina, &["run"]);
        cmd.env("CATALINA_HOME", CATALINA_HOME)
            .env("CATALINA_BASE", base.path())
            .env("CATALINA_TMPDIR", base.path().join("temp"))
            .env("JAVA_OPTS", JAVA_OPTS)
            .env_remove("CATALINA_OPTS")
            .env_remove("CATALINA_PID")
            .env_remove("JPDA_OPTS")
            .current_dir(base.path());
        let mut child = Child::spawn(cmd)?;
        child.set_grace(STOP_GRACE);
        let started = Instant::now();
        // `ip netns exec` and catalina.sh both exec; wait until the PID runs the JVM.
        let exe = format!("/proc/{}/exe", child.pid());
        loop {
            if let Some(status) = child.try_wait()? {
                return Err(io::Error::other(format!(
                    "catalina.sh run exited ({status}) before starting java\n--- stderr ---\n{}",
                    child.stderr_text()
                )));
            }
            let is_java = fs::read_link(&exe)
                .ok()
                .and_then(|p| p.file_name().map(|n| n == "java"))
                .unwrap_or(false);
            if is_java {
                break;
            }
            if started.elapsed() > Duration::from_secs(10) {
                return Err(io::Error::other(format!(
                    "pid {} did not become java within 10 s ({} is {:?}); catalina.sh no longer \
                     execs the JVM?",
                    child.pid(),
                    exe,
                    fs::read_link(&exe).ok()
                )));
            }
            thread::sleep(Duration::from_millis(10));
        }
        Ok(Tomcat {
            child,
            ajp: base.ajp_addr(),
            started,
        })
    }

    /// The JVM's PID.
    pub fn pid(&self) -> u32 {
        self.child.pid()
    }

    /// True while the JVM runs.
    pub fn is_running(&mut self) -> bool {
        self.child.is_running()
    }

    /// Poll with CPings from namespace `from_ns` (any local source address) until one is answered
    /// by a CPong; returns when that first happened (measured from the CPing that succeeded).
    /// Fails after `timeout`, or at once when the JVM exits.
    pub fn wait_cping(&mut self, from_ns: &str, timeout: Duration) -> io::Result<Instant> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Err(io::Error::other(format!(
                    "Tomcat (pid {}) exited ({status}) before answering a CPing on {}\n--- stderr ---\n{}",
                    self.pid(),
                    self.ajp,
                    self.child.stderr_text()
                )));
            }
            let t = Instant::now();
            let last = match ajp_cping_from(from_ns, Ipv4Addr::UNSPECIFIED, self.ajp, Duration::from_secs(2))
            {
                Ok(reply) if reply == AJP_CPONG => return Ok(t),
                Ok(reply) => format!("answered {reply:02x?}"),
                Err(e) => e.to_string(),
            };
            if Instant::now() >= deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "Tomcat (pid {}) did not answer a CPing on {} within {timeout:?} (started \
                         {:?} ago; last attempt: {last})\n--- stderr ---\n{}",
                        self.pid(),
                        self.ajp,
                        self.started.elapsed(),
                        self.child.stderr_text()
                    ),
                ));
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM the JVM (Tomcat's shutdown hook closes the connectors) and wait for it to exit;
    /// SIGKILL after [`STOP_GRACE`].
    pub fn stop(&mut self) -> io::Result<ExitStatus> {
        self.child.stop()
    }

    /// Send SIGTERM to the JVM without waiting (see [`Tomcat::wait_exit`]).
    pub fn terminate(&mut self) -> io::Result<()> {
        self.child.signal(nix::sys::signal::Signal::SIGTERM)
    }

    /// Wait up to `timeout` for the JVM to exit; `None` if it still runs.
    pub fn wait_exit(&mut self, timeout: Duration) -> io::Result<Option<ExitStatus>> {
        self.child.wait_timeout(timeout)
    }

    /// Tomcat's console output (stderr) so far.
    pub fn stderr_text(&self) -> String {
        self.child.stderr_text()
    }
}

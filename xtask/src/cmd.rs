//! Running external commands: every command is printed (with the environment it changes) before it
//! runs, and a failure names the command.

use std::{
    ffi::{OsStr, OsString},
    fmt,
    path::{Path, PathBuf},
    process::{Command, ExitStatus, Stdio},
};

use anyhow::{Context, Result, bail};

/// A command plus what we changed about its environment, so it can be shown as a shell line.
pub struct Cmd {
    inner: Command,
    shown_env: Vec<(OsString, Option<OsString>)>,
    dir: Option<PathBuf>,
}

impl Cmd {
    pub fn new(program: impl AsRef<OsStr>) -> Self {
        Self {
            inner: Command::new(program),
            shown_env: Vec::new(),
            dir: None,
        }
    }

    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> Self {
        self.inner.arg(arg);
        self
    }

    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.inner.args(args);
        self
    }

    /// Sets a variable and shows it in the printed command line.
    pub fn env(mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> Self {
        self.inner.env(&key, &value);
        self.shown_env
            .push((key.as_ref().to_owned(), Some(value.as_ref().to_owned())));
        self
    }

    /// Removes a variable (shown as `-u KEY` when it was set).
    pub fn env_remove(mut self, key: impl AsRef<OsStr>) -> Self {
        if std::env::var_os(&key).is_some() {
            self.shown_env.push((key.as_ref().to_owned(), None));
        }
        self.inner.env_remove(key);
        self
    }

    pub fn current_dir(mut self, dir: impl AsRef<Path>) -> Self {
        self.inner.current_dir(&dir);
        self.dir = Some(dir.as_ref().to_owned());
        self
    }

    /// Runs the command with inherited stdio; a non-zero exit is an error.
    pub fn run(mut self) -> Result<()> {
        let status = self.status()?;
        if !status.success() {
            bail!("command failed ({status}): {self}");
        }
        Ok(())
    }

    /// Runs the command with inherited stdio and returns its exit status.
    pub fn status(&mut self) -> Result<ExitStatus> {
        eprintln!("$ {self}");
        let status = self.inner.status();
        status.with_context(|| format!("could not start: {self}"))
    }

    /// Runs the command quietly (not printed): its stdout if it exits 0, `None` if it fails or
    /// cannot start. For probes such as `dpkg-query`.
    pub fn probe(mut self) -> Option<String> {
        let out = self.inner.stderr(Stdio::null()).output().ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Replaces this process with the command (Unix `exec`); returns only on failure.
    pub fn exec(mut self) -> anyhow::Error {
        use std::os::unix::process::CommandExt;
        eprintln!("$ exec {self}");
        let err = self.inner.exec();
        anyhow::Error::new(err).context(format!("could not exec: {self}"))
    }
}

impl fmt::Display for Cmd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(dir) = &self.dir {
            write!(f, "(cd {} && ", quote(dir.as_os_str()))?;
        }
        let removed: Vec<_> = self.shown_env.iter().filter(|(_, v)| v.is_none()).collect();
        if !removed.is_empty() {
            write!(f, "env")?;
            for (k, _) in removed {
                write!(f, " -u {}", k.to_string_lossy())?;
            }
            write!(f, " ")?;
        }
        for (k, v) in &self.shown_env {
            if let Some(v) = v {
                write!(f, "{}={} ", k.to_string_lossy(), quote(v))?;
            }
        }
        write!(f, "{}", quote(self.inner.get_program()))?;
        for a in self.inner.get_args() {
            write!(f, " {}", quote(a))?;
        }
        if self.dir.is_some() {
            write!(f, ")")?;
        }
        Ok(())
    }
}

/// Shell-quotes a word when it needs it.
fn quote(s: &OsStr) -> String {
    let s = s.to_string_lossy();
    let plain = !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%^".contains(c));
    if plain {
        s.into_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

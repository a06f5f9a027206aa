//! `lb-testsrv`: small, dependable backends for the netns integration tests and the demo.
//!
//! ```text
//! lb-testsrv http --listen ADDR --name NAME     HTTP/1.1, every request -> 200 "NAME\n"
//! lb-testsrv echo --listen ADDR                 echoes bytes; on client half-close, finishes and closes
//! lb-testsrv ajp  --listen ADDR --mode MODE     AJP 1.3 CPing peer (good|silent|garbage|cpong-close|reset|slow-cpong)
//! ```
//!
//! Every subcommand prints `ready` on stdout once its socket is bound, so the harness can wait for it.
//! One std thread per connection; no async. Exits on SIGTERM/SIGINT (default signal action).

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::process::ExitCode;
use std::thread;
use std::time::Duration;

const USAGE: &str = "usage:
  lb-testsrv http --listen ADDR --name NAME
  lb-testsrv echo --listen ADDR
  lb-testsrv ajp  --listen ADDR --mode good|silent|garbage|cpong-close|reset|slow-cpong";

const AJP_CPING_PAYLOAD: u8 = 0x0A;
const AJP_CPONG: [u8; 5] = [0x41, 0x42, 0x00, 0x01, 0x09];
const AJP_GARBAGE: [u8; 5] = [0xde, 0xad, 0xbe, 0xef, 0x00];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum AjpMode {
    Good,
    Silent,
    Garbage,
    CpongClose,
    Reset,
    SlowCpong,
}

impl AjpMode {
    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "good" => Self::Good,
            "silent" => Self::Silent,
            "garbage" => Self::Garbage,
            "cpong-close" => Self::CpongClose,
            "reset" => Self::Reset,
            "slow-cpong" => Self::SlowCpong,
            _ => return None,
        })
    }
}

enum Cmd {
    Http { listen: String, name: String },
    Echo { listen: String },
    Ajp { listen: String, mode: AjpMode },
}

fn parse_args(args: &[String]) -> Result<Cmd, String> {
    let (sub, rest) = args.split_first().ok_or("missing subcommand")?;
    let mut listen = None;
    let mut name = None;
    let mut mode = None;
    let mut it = rest.iter();
    while let Some(flag) = it.next() {
        let mut value = || it.next().cloned().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--listen" => listen = Some(value()?),
            "--name" => name = Some(value()?),
            "--mode" => mode = Some(value()?),
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    let listen = listen.ok_or("--listen ADDR is required")?;
    match sub.as_str() {
        "http" => Ok(Cmd::Http {
            listen,
            name: name.ok_or("http needs --name NAME")?,
        }),
        "echo" => Ok(Cmd::Echo { listen }),
        "ajp" => {
            let m = mode.ok_or("ajp needs --mode MODE")?;
            let mode = AjpMode::parse(&m).ok_or_else(|| format!("unknown ajp mode {m:?}"))?;
            Ok(Cmd::Ajp { listen, mode })
        }
        other => Err(format!("unknown subcommand {other:?}")),
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let cmd = match parse_args(&args) {
        Ok(c) => c,
        Err(e) => {
            if !e.is_empty() {
                eprintln!("lb-testsrv: {e}");
            }
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    let listen = match &cmd {
        Cmd::Http { listen, .. } | Cmd::Echo { listen } | Cmd::Ajp { listen, .. } => listen.clone(),
    };
    let listener = match TcpListener::bind(&listen) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("lb-testsrv: cannot bind {listen}: {e}");
            return ExitCode::FAILURE;
        }
    };
    {
        let mut out = io::stdout().lock();
        let _ = writeln!(out, "ready");
        let _ = out.flush();
    }
    let cmd: &'static Cmd = Box::leak(Box::new(cmd));
    for conn in listener.incoming() {
        match conn {
            Ok(stream) => {
                let _ = stream.set_nodelay(true);
                thread::spawn(move || {
                    let _ = match cmd {
                        Cmd::Http { name, .. } => serve_http(stream, name),
                        Cmd::Echo { .. } => serve_echo(stream),
                        Cmd::Ajp { mode, .. } => serve_ajp(stream, *mode),
                    };
                });
            }
            Err(e) => {
                eprintln!("lb-testsrv: accept: {e}");
                thread::sleep(Duration::from_millis(10));
            }
        }
    }
    ExitCode::SUCCESS
}

/// Minimal HTTP/1.1: every request gets `200 OK` with body `NAME\n`. Keep-alive by default for
/// HTTP/1.1, close for HTTP/1.0 unless `Connection: keep-alive`; `Connection: close` honoured.
fn serve_http(stream: TcpStream, name: &str) -> io::Result<()> {
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    let body = format!("{name}\n");
    let mut line = String::new();
    loop {
        // Request line (skip stray empty lines between requests, as RFC 9112 allows).
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        if line.trim().is_empty() {
            continue;
        }
        let http10 = line.trim_end().ends_with("HTTP/1.0");
        let mut keep_alive = !http10;
        let mut content_length: u64 = 0;
        loop {
            line.clear();
            if reader.read_line(&mut line)? == 0 {
                return Ok(());
            }
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            if let Some((k, v)) = l.split_once(':') {
                let (k, v) = (k.trim(), v.trim());
                if k.eq_ignore_ascii_case("connection") {
                    for tok in v.split(',') {
                        let tok = tok.trim();
                        if tok.eq_ignore_ascii_case("close") {
                            keep_alive = false;
                        } else if tok.eq_ignore_ascii_case("keep-alive") {
                            keep_alive = true;
                        }
                    }
                } else if k.eq_ignore_ascii_case("content-length") {
                    content_length = v.parse().unwrap_or(0);
                }
            }
        }
        if content_length > 0 {
            io::copy(&mut (&mut reader).take(content_length), &mut io::sink())?;
        }
        let resp = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nX-Backend: {name}\r\n{}\r\n{body}",
            body.len(),
            if keep_alive {
                "Connection: keep-alive\r\n"
            } else {
                "Connection: close\r\n"
            },
        );
        writer.write_all(resp.as_bytes())?;
        if !keep_alive {
            let _ = writer.shutdown(Shutdown::Write);
            // Drain what the client may still send so close() does not turn into a RST.
            let _ = io::copy(&mut reader, &mut io::sink());
            return Ok(());
        }
    }
}

/// Echo everything; on read EOF (client half-close) all data has been written back already, so
/// shut down our write side and close.
fn serve_echo(mut stream: TcpStream) -> io::Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        stream.write_all(&buf[..n])?;
    }
    stream.flush()?;
    stream.shutdown(Shutdown::Write)
}

/// Read one AJP packet sent to the container (`12 34 LEN_HI LEN_LO payload…`); `None` on EOF or
/// a bad magic (the connection is then closed).
fn read_ajp_packet(stream: &mut TcpStream) -> io::Result<Option<Vec<u8>>> {
    let mut hdr = [0u8; 4];
    match stream.read_exact(&mut hdr) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    if hdr[0] != 0x12 || hdr[1] != 0x34 {
        return Ok(None);
    }
    let len = u16::from_be_bytes([hdr[2], hdr[3]]) as usize;
    let mut payload = vec![0u8; len];
    stream.read_exact(&mut payload)?;
    Ok(Some(payload))
}

fn is_cping(payload: &[u8]) -> bool {
    payload == [AJP_CPING_PAYLOAD]
}

fn serve_ajp(mut stream: TcpStream, mode: AjpMode) -> io::Result<()> {
    match mode {
        AjpMode::Reset => {
            let linger = nix::libc::linger {
                l_onoff: 1,
                l_linger: 0,
            };
            nix::sys::socket::setsockopt(&stream.as_fd(), nix::sys::socket::sockopt::Linger, &linger)
                .map_err(io::Error::from)?;
            drop(stream); // close with linger 0 => RST
            Ok(())
        }
        AjpMode::Silent => {
            // Never answer; keep the connection open until the peer goes away.
            io::copy(&mut stream, &mut io::sink())?;
            Ok(())
        }
        AjpMode::Good | AjpMode::SlowCpong | AjpMode::Garbage | AjpMode::CpongClose => {
            while let Some(payload) = read_ajp_packet(&mut stream)? {
                if !is_cping(&payload) {
                    // Not a CPing: a real container would process a request; we just ignore it.
                    continue;
                }
                match mode {
                    AjpMode::Good => stream.write_all(&AJP_CPONG)?,
                    AjpMode::SlowCpong => {
                        thread::sleep(Duration::from_secs(3));
                        stream.write_all(&AJP_CPONG)?;
                    }
                    AjpMode::Garbage => stream.write_all(&AJP_GARBAGE)?,
                    AjpMode::CpongClose => {
                        stream.write_all(&AJP_CPONG[..3])?;
                        let _ = stream.shutdown(Shutdown::Write);
                        return Ok(());
                    }
                    AjpMode::Silent | AjpMode::Reset => unreachable!(),
                }
            }
            Ok(())
        }
    }
}

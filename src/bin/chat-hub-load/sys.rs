//! What the generator reads from the operating system: /proc (memory, CPU,
//! limits) and the target address (loopback unless allowed otherwise).

use std::net::{SocketAddr, ToSocketAddrs};

/// Resident memory of a process in KiB (`VmRSS` of /proc/<pid>/status).
pub fn rss_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Resident memory of several processes (the nodes of a cluster) in KiB,
/// summed; `None` when there are none or one cannot be read.
pub fn rss_kib_sum(pids: &[u32]) -> Option<u64> {
    if pids.is_empty() {
        return None;
    }
    pids.iter().map(|p| rss_kib(*p)).sum()
}

/// CPU seconds of several processes, summed; `None` when there are none or
/// one cannot be read.
pub fn cpu_secs_sum(pids: &[u32]) -> Option<f64> {
    if pids.is_empty() {
        return None;
    }
    pids.iter().map(|p| cpu_secs(&p.to_string())).sum()
}

/// `--server-pid 12,34`: one or more process ids.
pub fn parse_pids(s: &str) -> Result<Vec<u32>, String> {
    s.split(',')
        .map(|p| {
            p.trim()
                .parse::<u32>()
                .map_err(|_| format!("--server-pid {s:?}: {p:?} is not a process id"))
        })
        .collect()
}

/// User + system CPU time of a process in seconds (/proc/<pid>/stat, 100 Hz ticks).
pub fn cpu_secs(pid: &str) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may contain spaces) start at field 3.
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = f.get(11)?.parse().ok()?;
    let stime: f64 = f.get(12)?.parse().ok()?;
    Some((utime + stime) / 100.0)
}

/// Soft and hard RLIMIT_NOFILE of this process, from /proc/self/limits.
fn nofile() -> Option<(u64, u64)> {
    let s = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = s.lines().find(|l| l.starts_with("Max open files"))?;
    let f: Vec<&str> = line["Max open files".len()..].split_whitespace().collect();
    let parse = |v: &str| -> Option<u64> {
        if v == "unlimited" {
            Some(u64::MAX)
        } else {
            v.parse().ok()
        }
    };
    Some((parse(f.first()?)?, parse(f.get(1)?)?))
}

/// Make sure this process may open `needed` files: raise the soft limit up to
/// the hard one with `prlimit` (util-linux) if that helps, else fail clearly.
pub fn ensure_nofile(needed: u64) -> Result<u64, String> {
    let Some((soft, hard)) = nofile() else {
        return Ok(0);
    };
    if soft >= needed {
        return Ok(soft);
    }
    if hard >= needed {
        let _ = std::process::Command::new("prlimit")
            .arg(format!("--pid={}", std::process::id()))
            .arg(format!("--nofile={hard}:{hard}"))
            .status();
        if let Some((soft, _)) = nofile() {
            if soft >= needed {
                return Ok(soft);
            }
        }
    }
    Err(format!(
        "this run needs about {needed} open files but RLIMIT_NOFILE is {soft} (hard {hard}); \
         run it from a shell after `ulimit -n {needed}` (or fewer connections)"
    ))
}

/// A `ws://host:port/path` URL taken apart.
#[derive(Clone, Debug)]
pub struct Target {
    /// The URL without query string, e.g. `ws://127.0.0.1:8080/ws`.
    pub url: String,
    pub addr: SocketAddr,
    pub loopback: bool,
}

/// `--url`: one URL, or several separated by commas (the nodes of one cluster).
pub fn parse_targets(urls: &str) -> Result<Vec<Target>, String> {
    let targets = urls
        .split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .map(parse_target)
        .collect::<Result<Vec<_>, _>>()?;
    if targets.is_empty() {
        return Err("--url: no URL given".into());
    }
    Ok(targets)
}

pub fn parse_target(url: &str) -> Result<Target, String> {
    let rest = url
        .strip_prefix("ws://")
        .ok_or_else(|| format!("--url {url:?}: only ws:// URLs are supported"))?;
    let (hostport, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/ws"),
    };
    if path.contains('?') {
        return Err(format!(
            "--url {url:?}: no query string please (the token is added)"
        ));
    }
    let with_port = if hostport
        .rsplit_once(':')
        .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
    {
        hostport.to_string()
    } else {
        format!("{hostport}:80")
    };
    let addrs: Vec<SocketAddr> = with_port
        .to_socket_addrs()
        .map_err(|e| format!("--url {url:?}: cannot resolve {with_port}: {e}"))?
        .collect();
    let addr = *addrs
        .first()
        .ok_or_else(|| format!("--url {url:?}: {with_port} resolves to nothing"))?;
    Ok(Target {
        url: format!("ws://{hostport}{path}"),
        addr,
        loopback: addrs.iter().all(|a| a.ip().is_loopback()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets() {
        let t = parse_target("ws://127.0.0.1:8080/ws").unwrap();
        assert!(t.loopback);
        assert_eq!(t.addr.port(), 8080);
        assert!(parse_target("ws://localhost:9/ws").unwrap().loopback);
        assert!(!parse_target("ws://10.1.2.3:80/ws").unwrap().loopback);
        assert!(parse_target("http://127.0.0.1/ws").is_err());
        let ts = parse_targets("ws://127.0.0.1:8081/ws, ws://127.0.0.1:8082/ws,").unwrap();
        assert_eq!(ts.len(), 2);
        assert_eq!(ts[1].addr.port(), 8082);
        assert_eq!(ts[1].url, "ws://127.0.0.1:8082/ws");
        assert!(parse_targets(" , ").is_err());
        assert!(parse_targets("ws://127.0.0.1:1/ws,http://127.0.0.1/").is_err());
        assert_eq!(parse_pids("12, 34").unwrap(), vec![12, 34]);
        assert!(parse_pids("12,x").is_err());
    }

    #[test]
    fn own_process() {
        assert!(cpu_secs("self").is_some());
        assert!(rss_kib(std::process::id()).unwrap() > 0);
        let me = std::process::id();
        assert_eq!(rss_kib_sum(&[]), None);
        assert!(rss_kib_sum(&[me, me]).unwrap() >= 2 * rss_kib(me).unwrap() / 2);
        assert!(cpu_secs_sum(&[me]).is_some());
        assert!(ensure_nofile(10).is_ok());
    }
}

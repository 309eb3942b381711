//! Test hosts in network namespaces, for fault tests that need the kernel to misbehave (UDP
//! dropped by iptables, random TCP loss, a name that resolves to two replicas): a namespace with
//! a veth pair to the host, in a /29 of a private range used for nothing else, deleted on drop.
//! Traffic goes only to these addresses and loopback. Needs root, `ip` and `iptables`; where
//! that is impossible, [`netns_or_skip`] says why and the test skips itself.

use std::path::Path;

/// A network namespace with a veth pair to the host: `host_ips` on the host end, `ns_ip` on the
/// inner end, in one /29 of a private range used for nothing else. Deleted (with its veth pair
/// and any `/etc/netns/NAME` files) on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
    /// The two addresses on the host end of the veth pair.
    pub host_ips: [String; 2],
    /// The address inside the namespace.
    pub ns_ip: String,
}

fn run(cmd: &[&str]) -> Result<(), String> {
    let (program, args) = cmd.split_first().ok_or("empty command")?;
    let out = std::process::Command::new(program).args(args).output().map_err(|e| format!("{program}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("{}: {}", cmd.join(" "), String::from_utf8_lossy(&out.stderr).trim()))
    }
}

impl Netns {
    /// Creates the namespace, or says why it cannot (not root, no `ip` or `iptables`).
    pub fn create(tag: u8) -> Result<Self, String> {
        let uid = std::process::Command::new("id").arg("-u").output().map_err(|e| e.to_string())?;
        if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
            return Err("not root".into());
        }
        run(&["iptables", "--version"])?;
        let id = std::process::id() % 10_000;
        let name = format!("acsr-{id}-{tag}");
        let (host_if, ns_if) = (format!("acsrh{id}{tag}"), format!("acsrn{id}{tag}"));
        // A /29 per test: .1 and .3 on the host end, .2 inside.
        let subnet = (id % 250) as u8;
        let at = |n: u8| format!("10.213.{subnet}.{}", tag * 8 + n);
        let (host_ips, ns_ip) = ([at(1), at(3)], at(2));
        let ns = Self { name: name.clone(), host_ips: host_ips.clone(), ns_ip: ns_ip.clone() };
        run(&["ip", "netns", "add", &name])?;
        run(&["ip", "link", "add", &host_if, "type", "veth", "peer", "name", &ns_if])?;
        run(&["ip", "link", "set", &ns_if, "netns", &name])?;
        for ip in &host_ips {
            run(&["ip", "addr", "add", &format!("{ip}/29"), "dev", &host_if])?;
        }
        run(&["ip", "link", "set", &host_if, "up"])?;
        ns.exec(&["ip", "addr", "add", &format!("{ns_ip}/29"), "dev", &ns_if])?;
        ns.exec(&["ip", "link", "set", &ns_if, "up"])?;
        ns.exec(&["ip", "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// Runs `cmd` inside the namespace.
    pub fn exec(&self, cmd: &[&str]) -> Result<(), String> {
        let mut full = vec!["ip", "netns", "exec", self.name.as_str()];
        full.extend_from_slice(cmd);
        run(&full)
    }

    /// Makes `name` resolve to `ips` for processes run in the namespace (`ip netns exec`
    /// bind-mounts `/etc/netns/NAME/hosts` over `/etc/hosts`).
    pub fn hosts(&self, name: &str, ips: &[String]) -> Result<(), String> {
        let dir = Path::new("/etc/netns").join(&self.name);
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        let text: String = ips.iter().map(|ip| format!("{ip} {name}\n")).collect();
        std::fs::write(dir.join("hosts"), format!("127.0.0.1 localhost\n{text}")).map_err(|e| e.to_string())
    }

    /// The namespace's name (for `ip netns exec NAME ...`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The command prefix that runs a process inside the namespace.
    pub fn wrapper(&self) -> [&str; 4] {
        ["ip", "netns", "exec", self.name.as_str()]
    }
}

/// A namespace for one test, or `None`, with the reason printed, where none can be made (the test
/// then skips itself).
pub fn netns_or_skip(tag: u8) -> Option<Netns> {
    Netns::create(tag)
        .map_err(|reason| {
            eprintln!("skipped: this test needs root, ip and iptables for a network namespace ({reason})")
        })
        .ok()
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting the namespace deletes the veth pair with it.
        let _ = run(&["ip", "netns", "del", &self.name]);
        let _ = std::fs::remove_dir_all(Path::new("/etc/netns").join(&self.name));
    }
}

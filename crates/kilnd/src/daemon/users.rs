//! User lookup by parsing the sandbox's `/etc/passwd` and `/etc/group` directly (the binary is
//! static glibc: NSS functions such as `getpwnam` must not be used).

use kiln_protocol::kilnd::{DaemonError, DaemonErrorCode};

/// Who a process runs as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups (including `gid`).
    pub groups: Vec<u32>,
    pub name: Option<String>,
    pub home: String,
    /// Login shell from passwd, if any.
    pub shell: Option<String>,
}

struct PasswdEntry<'a> {
    name: &'a str,
    uid: u32,
    gid: u32,
    home: &'a str,
    shell: &'a str,
}

fn passwd_entries(passwd: &str) -> impl Iterator<Item = PasswdEntry<'_>> {
    passwd.lines().filter_map(|line| {
        let f: Vec<&str> = line.split(':').collect();
        if f.len() < 7 || line.starts_with('#') {
            return None;
        }
        Some(PasswdEntry {
            name: f[0],
            uid: f[2].parse().ok()?,
            gid: f[3].parse().ok()?,
            home: f[5],
            shell: f[6],
        })
    })
}

/// (name, gid, members)
fn group_entries(group: &str) -> impl Iterator<Item = (&str, u32, Vec<&str>)> {
    group.lines().filter_map(|line| {
        let f: Vec<&str> = line.split(':').collect();
        if f.len() < 4 || line.starts_with('#') {
            return None;
        }
        let members = f[3].split(',').filter(|m| !m.is_empty()).collect();
        Some((f[0], f[2].parse().ok()?, members))
    })
}

fn invalid(message: String) -> DaemonError {
    DaemonError {
        code: DaemonErrorCode::Invalid,
        message,
    }
}

/// Resolves `spec` (`name`, `uid`, `name:group`, `uid:gid`; `None` = root) against the
/// contents of `/etc/passwd` and `/etc/group`.
pub fn resolve_in(spec: Option<&str>, passwd: &str, group: &str) -> Result<User, DaemonError> {
    let spec = spec.map(str::trim).filter(|s| !s.is_empty()).unwrap_or("0");
    let (user_part, group_part) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    let entry = match user_part.parse::<u32>() {
        Ok(uid) => passwd_entries(passwd).find(|e| e.uid == uid),
        Err(_) => passwd_entries(passwd).find(|e| e.name == user_part),
    };
    let mut user = match (entry, user_part.parse::<u32>()) {
        (Some(e), _) => User {
            uid: e.uid,
            gid: e.gid,
            groups: Vec::new(),
            name: Some(e.name.to_string()),
            home: if e.home.is_empty() {
                "/".into()
            } else {
                e.home.to_string()
            },
            shell: Some(e.shell.to_string()).filter(|s| !s.is_empty()),
        },
        // A numeric uid without a passwd entry: gid 0, home `/` (like Docker).
        (None, Ok(uid)) => User {
            uid,
            gid: 0,
            groups: Vec::new(),
            name: None,
            home: "/".into(),
            shell: None,
        },
        (None, Err(_)) => return Err(invalid(format!("unknown user: {user_part}"))),
    };
    if let Some(g) = group_part {
        user.gid = match g.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => group_entries(group)
                .find(|(name, _, _)| *name == g)
                .map(|(_, gid, _)| gid)
                .ok_or_else(|| invalid(format!("unknown group: {g}")))?,
        };
    }
    let mut groups = vec![user.gid];
    if group_part.is_none() {
        if let Some(name) = &user.name {
            for (_, gid, members) in group_entries(group) {
                if members.contains(&name.as_str()) && !groups.contains(&gid) {
                    groups.push(gid);
                }
            }
        }
    }
    user.groups = groups;
    Ok(user)
}

/// Resolves `spec` against the files of the running system.
pub fn resolve(spec: Option<&str>) -> Result<User, DaemonError> {
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    let group = std::fs::read_to_string("/etc/group").unwrap_or_default();
    resolve_in(spec, &passwd, &group)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/bash\n\
        # comment\n\
        daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin\n\
        agent:x:1000:1000:Agent,,,:/home/agent:/bin/zsh\n\
        broken:x:notanumber:1::/:\n";
    const GROUP: &str = "root:x:0:\nsudo:x:27:agent\nagent:x:1000:\ndocker:x:999:daemon,agent\n";

    #[test]
    fn resolves_users() {
        let cases = [
            None,
            Some("agent"),
            Some("1000"),
            Some("1000:27"),
            Some("agent:docker"),
            Some("4242"),
            Some("4242:4242"),
            Some("nobody-here"),
            Some("agent:nogroup"),
            Some("broken"),
        ];
        let mut out = String::new();
        for c in cases {
            let r = resolve_in(c, PASSWD, GROUP);
            out.push_str(&format!("{c:?} => {r:?}\n"));
        }
        expect_test::expect![[r#"
            None => Ok(User { uid: 0, gid: 0, groups: [0], name: Some("root"), home: "/root", shell: Some("/bin/bash") })
            Some("agent") => Ok(User { uid: 1000, gid: 1000, groups: [1000, 27, 999], name: Some("agent"), home: "/home/agent", shell: Some("/bin/zsh") })
            Some("1000") => Ok(User { uid: 1000, gid: 1000, groups: [1000, 27, 999], name: Some("agent"), home: "/home/agent", shell: Some("/bin/zsh") })
            Some("1000:27") => Ok(User { uid: 1000, gid: 27, groups: [27], name: Some("agent"), home: "/home/agent", shell: Some("/bin/zsh") })
            Some("agent:docker") => Ok(User { uid: 1000, gid: 999, groups: [999], name: Some("agent"), home: "/home/agent", shell: Some("/bin/zsh") })
            Some("4242") => Ok(User { uid: 4242, gid: 0, groups: [0], name: None, home: "/", shell: None })
            Some("4242:4242") => Ok(User { uid: 4242, gid: 4242, groups: [4242], name: None, home: "/", shell: None })
            Some("nobody-here") => Err(DaemonError { code: Invalid, message: "unknown user: nobody-here" })
            Some("agent:nogroup") => Err(DaemonError { code: Invalid, message: "unknown group: nogroup" })
            Some("broken") => Err(DaemonError { code: Invalid, message: "unknown user: broken" })
        "#]]
        .assert_eq(&out);
    }
}

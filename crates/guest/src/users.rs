//! `USER[:GROUP]` as an OCI image config or `cela run -u` gives it, resolved in a root
//! filesystem's `/etc/passwd` and `/etc/group`: a name must be listed there; a number need not
//! be (its primary group is then the one its passwd entry names, or the same number). Used by
//! the host for containers and by the init for microVMs, so both kinds of instance run an
//! image's command as the same user.

use std::path::Path;

/// A resolved user: ids and the home directory its passwd entry names (if any).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub uid: u32,
    pub gid: u32,
    pub home: Option<String>,
}

/// Largest `/etc/passwd` or `/etc/group` read (a system with many users has a few hundred
/// KiB).
const MAX_DB: u64 = 4 << 20;

/// One `/etc/passwd` or `/etc/group` entry: name, id, the fourth field (gid for passwd), and
/// the sixth (home for passwd). The file is the image's, read beneath `rootfs` and bounded
/// ([`crate::beneath`]); `Ok(None)` if it or the entry is missing.
type Entry = (u32, Option<u32>, Option<String>);

fn find_entry(
    rootfs: &Path,
    file: &str,
    matches: impl Fn(&str, &str) -> bool,
) -> Result<Option<Entry>, String> {
    let bytes = crate::beneath::read(rootfs, file, MAX_DB)
        .map_err(|e| format!("reading the image's /{file}: {e}"))?;
    let Some(bytes) = bytes else { return Ok(None) };
    let text = String::from_utf8_lossy(&bytes);
    Ok(text.lines().find_map(|line| {
        let f: Vec<&str> = line.split(':').collect();
        let (name, id) = (*f.first()?, *f.get(2)?);
        matches(name, id).then_some(())?;
        let id = id.parse().ok()?;
        let fourth = f.get(3).and_then(|g| g.parse().ok());
        let home = f.get(5).filter(|h| !h.is_empty()).map(|h| (*h).to_owned());
        Some((id, fourth, home))
    }))
}

/// Resolves `user` (`USER[:GROUP]`, each a name or a number) in `rootfs`; the error names
/// what is missing and where.
pub fn resolve(rootfs: &Path, user: &str) -> Result<Identity, String> {
    let (u, g) = match user.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (user, None),
    };
    let missing = |what: &str, name: &str, file: &str| {
        format!("user {user}: no {what} {name} in the image's /etc/{file}")
    };
    let (uid, primary, home) = match u.parse::<u32>() {
        Ok(uid) => match find_entry(rootfs, "etc/passwd", |_, id| id == u)? {
            Some((_, gid, home)) => (uid, gid.unwrap_or(uid), home),
            None => (uid, uid, None),
        },
        Err(_) => {
            let (uid, gid, home) = find_entry(rootfs, "etc/passwd", |name, _| name == u)?
                .ok_or_else(|| missing("user", u, "passwd"))?;
            (uid, gid.unwrap_or(uid), home)
        }
    };
    let gid = match g {
        None => primary,
        Some(g) => match g.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => {
                find_entry(rootfs, "etc/group", |name, _| name == g)?
                    .ok_or_else(|| missing("group", g, "group"))?
                    .0
            }
        },
    };
    Ok(Identity { uid, gid, home })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_numbers_resolve_as_docker_does() {
        let dir = std::env::temp_dir().join(format!("cela-users-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("etc")).unwrap();
        std::fs::write(
            dir.join("etc/passwd"),
            "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\nweb:x:33:44::/srv:/bin/sh\n",
        )
        .unwrap();
        std::fs::write(dir.join("etc/group"), "root:x:0:\nstaff:x:50:\n").unwrap();
        let id = |u| resolve(&dir, u);
        assert_eq!(
            id("web").unwrap(),
            Identity {
                uid: 33,
                gid: 44,
                home: Some("/srv".into())
            }
        );
        assert_eq!(id("web:staff").unwrap().gid, 50);
        assert_eq!(id("33:7").unwrap().gid, 7);
        assert_eq!(
            id("1234").unwrap(),
            Identity {
                uid: 1234,
                gid: 1234,
                home: None
            }
        );
        assert_eq!(id("65534").unwrap().home.as_deref(), Some("/nonexistent"));
        assert!(
            id("nosuch")
                .unwrap_err()
                .contains("no user nosuch in the image's /etc/passwd")
        );
        assert!(id("web:nogroup").unwrap_err().contains("no group nogroup"));
        // A hostile image: /etc/passwd a link to the host's, or to /dev/zero.
        std::fs::remove_file(dir.join("etc/passwd")).unwrap();
        std::os::unix::fs::symlink("/dev/zero", dir.join("etc/passwd")).unwrap();
        assert!(
            id("web").unwrap_err().contains("no user web"),
            "no /dev/zero in the root"
        );
        std::fs::create_dir_all(dir.join("dev")).unwrap();
        nix::unistd::mkfifo(
            &dir.join("dev/zero"),
            nix::sys::stat::Mode::from_bits(0o600).unwrap(),
        )
        .unwrap();
        assert!(id("web").unwrap_err().contains("not a regular file"));
        let outside = dir.with_extension("outside");
        std::fs::write(&outside, "root:x:0:0:root:/root:/bin/sh\n").unwrap();
        std::fs::remove_file(dir.join("etc/passwd")).unwrap();
        std::os::unix::fs::symlink(
            format!("../../../..{}", outside.display()),
            dir.join("etc/passwd"),
        )
        .unwrap();
        assert!(
            id("root").unwrap_err().contains("no user root"),
            "a file outside was read"
        );
        std::fs::remove_file(&outside).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

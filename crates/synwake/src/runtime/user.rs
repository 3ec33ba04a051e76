//! Which account a process function runs as: the function's `user` (name, uid or
//! uid:gid), else `nobody`. Root only when asked for by name or uid 0. A synwake that is
//! not root cannot switch, so its functions run as itself.

use std::ffi::{CStr, CString};

/// The account used when a function names none.
pub const DEFAULT_USER: &str = "nobody";

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum UserError {
    #[error("invalid user {0:?}: expected a user name, a uid, or uid:gid")]
    Syntax(String),
    #[error("user {0:?} does not exist on this host")]
    Unknown(String),
    #[error(
        "user {wanted:?} asked for, but synwake is not root (uid {euid}) and cannot switch users"
    )]
    NotRoot { wanted: String, euid: u32 },
}

/// Checks the form of a `user` value (existence is checked when an instance starts).
pub fn validate(user: &str) -> Result<(), UserError> {
    parse(user).map(|_| ())
}

/// A parsed `user` value.
#[derive(Debug, PartialEq)]
enum Wanted<'a> {
    Name(&'a str),
    Ids(u32, Option<u32>),
}

fn parse(user: &str) -> Result<Wanted<'_>, UserError> {
    let bad = || UserError::Syntax(user.to_string());
    let user_ok = !user.is_empty()
        && user.len() <= 64
        && user
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b':'));
    if !user_ok {
        return Err(bad());
    }
    match user.split_once(':') {
        Some((u, g)) => Ok(Wanted::Ids(
            u.parse().map_err(|_| bad())?,
            Some(g.parse().map_err(|_| bad())?),
        )),
        None if user.bytes().all(|b| b.is_ascii_digit()) => {
            Ok(Wanted::Ids(user.parse().map_err(|_| bad())?, None))
        }
        None if user.starts_with('-') => Err(bad()),
        None => Ok(Wanted::Name(user)),
    }
}

/// The account an instance is started as.
#[derive(Debug, Clone, PartialEq)]
pub struct RunAs {
    pub uid: u32,
    pub gid: u32,
    /// Login name and home, for USER/LOGNAME/HOME; `None` for a uid with no passwd entry.
    pub name: Option<String>,
    pub home: Option<String>,
}

/// Resolves a function's `user` (None: [`DEFAULT_USER`]). `Ok(None)` means "do not
/// switch": synwake is not root and runs the function as itself.
pub fn resolve(user: Option<&str>) -> Result<Option<RunAs>, UserError> {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    if euid != 0 {
        return match user {
            None => Ok(None),
            Some(u) => {
                let wanted = resolve_as_root(u)?;
                if wanted.uid == euid {
                    Ok(None)
                } else {
                    Err(UserError::NotRoot {
                        wanted: u.to_string(),
                        euid,
                    })
                }
            }
        };
    }
    resolve_as_root(user.unwrap_or(DEFAULT_USER)).map(Some)
}

fn resolve_as_root(user: &str) -> Result<RunAs, UserError> {
    match parse(user)? {
        Wanted::Name(name) => lookup_name(name).ok_or_else(|| UserError::Unknown(user.to_string())),
        Wanted::Ids(uid, gid) => {
            let entry = lookup_uid(uid);
            Ok(RunAs {
                uid,
                // A bare uid takes its passwd group, or the same number.
                gid: gid.unwrap_or_else(|| entry.as_ref().map_or(uid, |e| e.gid)),
                name: entry.as_ref().and_then(|e| e.name.clone()),
                home: entry.and_then(|e| e.home),
            })
        }
    }
}

fn lookup_name(name: &str) -> Option<RunAs> {
    let c = CString::new(name).ok()?;
    lookup(&|pwd, buf, len, out| {
        // SAFETY: all pointers are valid for the call; buf has len bytes.
        unsafe { libc::getpwnam_r(c.as_ptr(), pwd, buf, len, out) }
    })
}

fn lookup_uid(uid: u32) -> Option<RunAs> {
    lookup(&|pwd, buf, len, out| {
        // SAFETY: all pointers are valid for the call; buf has len bytes.
        unsafe { libc::getpwuid_r(uid, pwd, buf, len, out) }
    })
}

type PwCall<'a> = dyn Fn(*mut libc::passwd, *mut libc::c_char, libc::size_t, *mut *mut libc::passwd) -> libc::c_int
    + 'a;

fn lookup(call: &PwCall<'_>) -> Option<RunAs> {
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    // SAFETY: passwd is plain data; zeroed is a valid "empty" value.
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut out: *mut libc::passwd = std::ptr::null_mut();
    let rc = call(&mut pwd, buf.as_mut_ptr(), buf.len(), &mut out);
    if rc != 0 || out.is_null() {
        return None;
    }
    let text = |p: *const libc::c_char| {
        // SAFETY: getpw*_r filled these with NUL-terminated strings inside buf.
        (!p.is_null()).then(|| unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
    };
    Some(RunAs {
        uid: pwd.pw_uid,
        gid: pwd.pw_gid,
        name: text(pwd.pw_name),
        home: text(pwd.pw_dir),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forms() {
        assert_eq!(parse("nobody"), Ok(Wanted::Name("nobody")));
        assert_eq!(parse("1000"), Ok(Wanted::Ids(1000, None)));
        assert_eq!(parse("1000:100"), Ok(Wanted::Ids(1000, Some(100))));
        for bad in [
            "",
            "a b",
            "1000:",
            ":1",
            "x:y",
            "-rf",
            "a/b",
            "1:2:3",
            "99999999999",
        ] {
            assert!(parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn resolves_names_and_ids() {
        let root = resolve_as_root("root").unwrap();
        assert_eq!((root.uid, root.gid), (0, 0));
        assert_eq!(root.name.as_deref(), Some("root"));
        let r = resolve_as_root("0").unwrap();
        assert_eq!((r.uid, r.gid), (0, 0));
        let r = resolve_as_root("4242:4343").unwrap();
        assert_eq!((r.uid, r.gid), (4242, 4343));
        assert_eq!(
            resolve_as_root("no-such-user-synwake"),
            Err(UserError::Unknown("no-such-user-synwake".into()))
        );
    }
}

//! Request paths as the gateway routes and forwards them: dot segments resolved (RFC 3986
//! section 5.2.4, `%2e` counted as `.`), and user input quoted bounded in error bodies.

use std::borrow::Cow;

/// The longest piece of a request that an error body quotes.
const QUOTE_MAX: usize = 64;

/// `path` with `.` and `..` segments (also percent-encoded) resolved; `None` when the path
/// does not start with `/` (then there is nothing to route).
pub fn resolve_dot_segments(path: &str) -> Option<Cow<'_, str>> {
    if !path.starts_with('/') {
        return None;
    }
    if !path.split('/').any(|s| dots(s).is_some()) {
        return Some(Cow::Borrowed(path));
    }
    let mut out: Vec<&str> = Vec::new();
    let mut trailing_slash = false;
    let segments: Vec<&str> = path[1..].split('/').collect();
    for (i, seg) in segments.iter().enumerate() {
        let last = i + 1 == segments.len();
        match dots(seg) {
            Some(1) => trailing_slash = last,
            Some(_) => {
                out.pop();
                trailing_slash = last;
            }
            None => {
                out.push(seg);
                trailing_slash = false;
            }
        }
    }
    let mut p = String::with_capacity(path.len());
    for seg in &out {
        p.push('/');
        p.push_str(seg);
    }
    if trailing_slash || p.is_empty() {
        p.push('/');
    }
    Some(Cow::Owned(p))
}

/// 1 for a `.` segment, 2 for `..`, with `%2e` in either case counted as a dot.
fn dots(seg: &str) -> Option<u8> {
    if seg.len() > 6 || seg.is_empty() {
        return None;
    }
    let b = seg.as_bytes();
    let (mut i, mut n) = (0, 0u8);
    while i < b.len() {
        if b[i] == b'.' {
            i += 1;
        } else if b.len() - i >= 3 && b[i] == b'%' && b[i + 1] == b'2' && b[i + 2] | 0x20 == b'e' {
            i += 3;
        } else {
            return None;
        }
        n += 1;
    }
    (n <= 2).then_some(n)
}

/// Request input for an error body: at most 64 characters, control characters and quotes
/// escaped, with the full length said when cut.
pub fn quote(s: &str) -> String {
    let mut out = String::from("\"");
    let mut chars = s.chars();
    for c in chars.by_ref().take(QUOTE_MAX) {
        out.extend(c.escape_debug());
    }
    out.push('"');
    if chars.next().is_some() {
        out.push_str(&format!("... ({} bytes)", s.len()));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(p: &str) -> String {
        resolve_dot_segments(p).unwrap().into_owned()
    }

    #[test]
    fn rfc3986_examples() {
        assert_eq!(r("/a/b/c/./../../g"), "/a/g");
        assert_eq!(r("/mid/content=5/../6"), "/mid/6");
        assert_eq!(r("/../../system/info"), "/system/info");
        assert_eq!(r("/function/f/../../system/info"), "/system/info");
        assert_eq!(r("/a/.."), "/");
        assert_eq!(r("/a/."), "/a/");
        assert_eq!(r("/.."), "/");
        assert_eq!(r("/a/b/"), "/a/b/");
        assert_eq!(r("/"), "/");
    }

    #[test]
    fn percent_encoded_dots() {
        assert_eq!(r("/f/%2e%2e/x"), "/x");
        assert_eq!(r("/f/%2E%2e/x"), "/x");
        assert_eq!(r("/f/.%2e/x"), "/x");
        assert_eq!(r("/f/%2e/x"), "/f/x");
        // Not dot segments: kept as they are.
        assert_eq!(r("/f/..a/x"), "/f/..a/x");
        assert_eq!(r("/f/.../x"), "/f/.../x");
        assert_eq!(r("/f/%2f../x"), "/f/%2f../x");
    }

    #[test]
    fn untouched_paths_are_borrowed() {
        assert!(matches!(
            resolve_dot_segments("/function/hello/a.b"),
            Some(Cow::Borrowed(_))
        ));
        assert!(resolve_dot_segments("*").is_none());
    }

    #[test]
    fn quote_bounds_and_escapes() {
        assert_eq!(quote("ab"), "\"ab\"");
        assert_eq!(quote("a\r\nb"), "\"a\\r\\nb\"");
        let q = quote(&"x".repeat(60_000));
        assert!(q.len() < 100, "{q}");
        assert!(q.ends_with("(60000 bytes)"), "{q}");
    }
}

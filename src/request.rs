//! A client's request as the listeners hand it to the proxy.
//!
//! Not an `http::Request`: that needs an `http::Uri`, and making one checks
//! the target byte by byte again after `httparse` has (about 4% of the
//! instructions of a short HTTP/1 request). An HTTP/1 target in origin form
//! whose bytes both parsers accept alike is kept as it came
//! ([`Target::Origin`]); everything else is parsed by `http` as before
//! ([`Target::Uri`]), so the proxy sees the same target either way.

use bytes::Bytes;
use http::{HeaderMap, Method, Uri, Version};

use crate::body::ClientBody;

/// One request from a client: its head, and its body still to be read.
#[derive(Debug)]
pub struct ClientRequest {
    pub method: Method,
    pub target: Target,
    pub version: Version,
    pub headers: HeaderMap,
    pub body: ClientBody,
}

impl ClientRequest {
    /// An HTTP/2 request as hyper hands it over.
    pub fn from_h2(req: http::Request<hyper::body::Incoming>) -> ClientRequest {
        let (parts, body) = req.into_parts();
        ClientRequest {
            method: parts.method,
            target: Target::Uri(parts.uri),
            version: parts.version,
            headers: parts.headers,
            body: ClientBody::H2(body),
        }
    }
}

/// The request target.
#[derive(Clone, Debug)]
pub enum Target {
    /// An HTTP/1 target in origin form (`/path?query`), as the client sent
    /// it: made only by [`Target::http1`], which leaves every target that
    /// `http::Uri` would refuse or change to [`Target::Uri`].
    Origin(Bytes),
    /// As `http` parsed it: HTTP/2's `:path` and `:authority`, and the
    /// HTTP/1 targets that are not plainly in origin form.
    Uri(Uri),
}

/// The longest target `http::Uri` takes.
const URI_MAX_LEN: usize = u16::MAX as usize - 1;

impl Target {
    /// An HTTP/1 request line's target, already checked by `httparse`
    /// (visible ASCII and UTF-8, no space or control byte). `None` if
    /// `http` refuses it. A target in origin form is kept as it is unless
    /// it holds a byte `http` treats apart: `#` (`http` cuts a fragment
    /// off), `<` and `>` (refused), a backtick (refused in the path) or
    /// `"` (refused in the query). Those few, and every other form
    /// (`*`, absolute), go through `http::Uri` as before.
    pub fn http1(target: Bytes) -> Option<Target> {
        let plain = target.first() == Some(&b'/')
            && target.len() <= URI_MAX_LEN
            && memchr::memchr3(b'#', b'<', b'>', &target).is_none()
            && memchr::memchr2(b'`', b'"', &target).is_none();
        if plain {
            Some(Target::Origin(target))
        } else {
            Uri::from_maybe_shared(target).ok().map(Target::Uri)
        }
    }

    /// The path and query to forward, `None` when there is none in
    /// absolute-path form (an authority-form or `*` target).
    pub fn path_and_query(&self) -> Option<&str> {
        self.as_str().filter(|pq| pq.starts_with('/'))
    }

    /// The path and query as the access log shows them, `*` included.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            // Cannot fail: `httparse` handed the target over as a `str`.
            Target::Origin(bytes) => std::str::from_utf8(bytes).ok(),
            Target::Uri(uri) => uri.path_and_query().map(|pq| pq.as_str()),
        }
    }

    /// The authority an HTTP/2 request (or an absolute-form HTTP/1 one)
    /// names.
    pub fn authority(&self) -> Option<&str> {
        match self {
            Target::Origin(_) => None,
            Target::Uri(uri) => uri.authority().map(|a| a.as_str()),
        }
    }
}

/// The path of a path and query.
pub fn path_of(path_and_query: &str) -> &str {
    match memchr::memchr(b'?', path_and_query.as_bytes()) {
        Some(i) => &path_and_query[..i],
        None => path_and_query,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the proxy forwarded when every target went through
    /// `http::Uri`, the reference.
    fn by_uri(target: &str) -> Option<String> {
        let uri = Uri::try_from(target).ok()?;
        let pq = uri.path_and_query()?.as_str();
        pq.starts_with('/').then(|| pq.to_string())
    }

    fn by_target(target: &str) -> Option<String> {
        let t = Target::http1(Bytes::copy_from_slice(target.as_bytes()))?;
        t.path_and_query().map(str::to_string)
    }

    #[test]
    fn a_target_is_forwarded_as_http_would_read_it_whichever_way_it_is_taken() {
        for target in [
            "/_matrix/client/v3/rooms/!room:example.org/send/m.room.message/1",
            "/_matrix/client/v3/sync?since=s72594_4483_1934&timeout=30000",
            "/_matrix/client/v3/rooms/%21room%3Aexample.org/state",
            "/_matrix/media/v3/download/example.org/abc?allow_redirect=true",
            // Bytes `http` cuts, refuses or takes only in one part.
            "/a#fragment",
            "/a?b=1#fragment",
            "/a<b",
            "/a?b>c",
            "/a`b",
            "/a?b=`c`",
            "/a\"b",
            "/a?b=\"c\"",
            "/a?filter={\"room\":1}",
            "/a/{b}?c={d}",
            // Not UTF-8 escapes but raw UTF-8, which httparse lets through.
            "/_matrix/client/v3/directory/room/#caf\u{e9}:example.org",
            "/caf\u{e9}?q=\u{e9}",
            "*",
            "http://example.org/a?b",
        ] {
            assert_eq!(by_target(target), by_uri(target), "{target}");
        }
    }

    #[test]
    fn a_plain_origin_target_is_kept_as_it_came_and_others_are_parsed() {
        let kept = Target::http1(Bytes::from_static(b"/a/b?c=d")).expect("valid");
        assert!(matches!(kept, Target::Origin(_)));
        assert_eq!(kept.path_and_query(), Some("/a/b?c=d"));
        assert_eq!(kept.authority(), None);
        let absolute = Target::http1(Bytes::from_static(b"http://example.org/a")).expect("valid");
        assert!(matches!(absolute, Target::Uri(_)));
        assert_eq!(absolute.authority(), Some("example.org"));
        assert!(Target::http1(Bytes::from_static(b"/a<b")).is_none());
    }

    #[test]
    fn the_path_ends_at_the_first_question_mark() {
        assert_eq!(path_of("/a/b?c=d?e"), "/a/b");
        assert_eq!(path_of("/a/b"), "/a/b");
    }
}

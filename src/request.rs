//! A client's request as the listeners hand it to the proxy.
//!
//! Not an `http::Request`: that needs an `http::Uri`, and making one checks
//! the target byte by byte again after `httparse` has (3.5% of the
//! instructions of a short HTTP/1 request). An HTTP/1 target in origin form
//! whose bytes both parsers accept alike is kept as it came
//! ([`Target::Origin`]); everything else is parsed by `http` as before
//! ([`Target::Uri`]), so the proxy sees the same target either way.
//!
//! Nor are an HTTP/1 request's headers put into a `HeaderMap`
//! ([`RequestHeaders::Lines`]): the proxy looks at a few of them and passes
//! the rest on, and building, hashing and dropping a map cost about 3% of a
//! short request's instructions. HTTP/2 requests keep hyper's map.

use std::ops::Range;

use bytes::Bytes;
use http::header::{CONNECTION, HeaderName, HeaderValue};
use http::{HeaderMap, Method, Uri, Version};
use smallvec::SmallVec;

use crate::body::ClientBody;
use crate::http1::{ConnectionOption, connection_options, is_hop_by_hop};

/// One request from a client: its head, and its body still to be read.
#[derive(Debug)]
pub struct ClientRequest {
    pub method: Method,
    pub target: Target,
    pub version: Version,
    pub headers: RequestHeaders,
    /// The body's declared length (`Content-Length`), as the listener read
    /// it: the HTTP/1 server while judging the body's framing, so that the
    /// proxy's size limit does not look it up and parse it again.
    pub length: Option<u64>,
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
            length: declared_length(&parts.headers),
            headers: RequestHeaders::Map(parts.headers),
            body: ClientBody::H2(body),
        }
    }
}

/// An HTTP/2 request's `Content-Length` (`h2` has refused the stream if
/// it is not a number).
fn declared_length(headers: &HeaderMap) -> Option<u64> {
    let value = headers.get(http::header::CONTENT_LENGTH)?;
    value.to_str().ok()?.trim().parse().ok()
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

pub const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");

/// A request's headers.
#[derive(Debug, Clone)]
pub enum RequestHeaders {
    /// An HTTP/1 head's header lines, in their order and spelling.
    Lines(HeaderLines),
    /// HTTP/2's (hyper's map), and any the edge had to add to.
    Map(HeaderMap),
}

/// The header lines of an HTTP/1 head, as slices of it.
#[derive(Debug, Clone, Default)]
pub struct HeaderLines {
    head: Bytes,
    /// Each line's name and value as offsets into `head`: name start and
    /// end, value start and end. On the heap: inline, they made the request
    /// large, and its moves cost more than the allocation.
    spans: Vec<[u32; 4]>,
}

impl HeaderLines {
    /// No lines yet, of a head whose `lines` lines will be `push`ed.
    pub fn new(head: Bytes, lines: usize) -> HeaderLines {
        HeaderLines {
            head,
            spans: Vec::with_capacity(lines),
        }
    }

    /// Adds a line whose name and value lie at these places in the head.
    /// `None` (and nothing added) if they do not lie in it.
    pub fn push(&mut self, name: Range<usize>, value: Range<usize>) -> Option<()> {
        let len = self.head.len();
        if name.start > name.end || name.end > len || value.start > value.end || value.end > len {
            return None;
        }
        let at = |n: usize| u32::try_from(n).ok();
        self.spans.push([
            at(name.start)?,
            at(name.end)?,
            at(value.start)?,
            at(value.end)?,
        ]);
        Some(())
    }

    fn name(&self, s: &[u32; 4]) -> &[u8] {
        self.head
            .get(s[0] as usize..s[1] as usize)
            .unwrap_or_default()
    }

    fn value(&self, s: &[u32; 4]) -> &[u8] {
        self.head
            .get(s[2] as usize..s[3] as usize)
            .unwrap_or_default()
    }

    /// Each line's name (as the client spelled it) and value.
    pub fn iter(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.spans.iter().map(|s| (self.name(s), self.value(s)))
    }

    /// The values of the lines with this name, in order.
    pub fn get_all<'a, 'n>(&'a self, name: &'n HeaderName) -> LineValues<'a, 'n> {
        LineValues {
            lines: self,
            spans: self.spans.iter(),
            wanted: name.as_str().as_bytes(),
        }
    }

    /// The lines as a map (names lower-cased, values shared with the head).
    fn to_map(&self) -> HeaderMap {
        let mut map = HeaderMap::with_capacity(self.spans.len());
        for s in &self.spans {
            // Both were checked by `httparse`, whose rules for names and
            // values are `http`'s: neither can fail.
            if let (Ok(name), Ok(value)) = (
                HeaderName::from_bytes(self.name(s)),
                HeaderValue::from_maybe_shared(self.head.slice(s[2] as usize..s[3] as usize)),
            ) {
                map.append(name, value);
            }
        }
        map
    }
}

impl From<HeaderMap> for RequestHeaders {
    fn from(map: HeaderMap) -> RequestHeaders {
        RequestHeaders::Map(map)
    }
}

impl Default for RequestHeaders {
    fn default() -> RequestHeaders {
        RequestHeaders::Map(HeaderMap::new())
    }
}

impl RequestHeaders {
    /// The first value of a header.
    pub fn get(&self, name: &HeaderName) -> Option<&[u8]> {
        match self {
            RequestHeaders::Lines(lines) => lines.get_all(name).next(),
            RequestHeaders::Map(map) => map.get(name).map(HeaderValue::as_bytes),
        }
    }

    /// Every value of a header, in order.
    pub fn get_all<'a, 'n>(&'a self, name: &'n HeaderName) -> Values<'a, 'n> {
        match self {
            RequestHeaders::Lines(lines) => Values::Lines(lines.get_all(name)),
            RequestHeaders::Map(map) => Values::Map(map.get_all(name).iter()),
        }
    }

    /// Whether the request has this header.
    pub fn contains(&self, name: &HeaderName) -> bool {
        self.get(name).is_some()
    }

    /// How many header lines (values) there are.
    pub fn len(&self) -> usize {
        match self {
            RequestHeaders::Lines(lines) => lines.spans.len(),
            RequestHeaders::Map(map) => map.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Each header's name and value: an HTTP/1 client's lines as they
    /// came, a map's names lower-case.
    pub fn for_each(&self, mut f: impl FnMut(&[u8], &[u8])) {
        match self {
            RequestHeaders::Lines(lines) => lines.iter().for_each(|(n, v)| f(n, v)),
            RequestHeaders::Map(map) => map
                .iter()
                .for_each(|(n, v)| f(n.as_str().as_bytes(), v.as_bytes())),
        }
    }

    /// Adds a header after the others (the lines become a map first; only
    /// an HTTP/1.0 request in absolute form without `Host` gets here).
    pub fn append(&mut self, name: HeaderName, value: HeaderValue) {
        if let RequestHeaders::Lines(lines) = self {
            *self = RequestHeaders::Map(lines.to_map());
        }
        if let RequestHeaders::Map(map) = self {
            map.append(name, value);
        }
    }

    /// A header's first value as shared bytes (the access log keeps it
    /// past the request).
    pub fn get_shared(&self, name: &HeaderName) -> Option<Bytes> {
        match self {
            RequestHeaders::Lines(lines) => {
                let wanted = name.as_str().as_bytes();
                let s = lines
                    .spans
                    .iter()
                    .find(|s| lines.name(s).eq_ignore_ascii_case(wanted))?;
                let range = s[2] as usize..s[3] as usize;
                // `push` checked that the range lies in the head.
                (range.end <= lines.head.len()).then(|| lines.head.slice(range))
            }
            RequestHeaders::Map(map) => Some(Bytes::copy_from_slice(map.get(name)?.as_bytes())),
        }
    }

    /// Drops the hop-by-hop headers (`http1::is_hop_by_hop`, and those
    /// `Connection` names), which concern the client's connection only.
    pub fn strip_hop_by_hop(&mut self) {
        match self {
            RequestHeaders::Map(map) => crate::proxy::strip_hop_by_hop(map),
            RequestHeaders::Lines(lines) => {
                // One walk over the names; most requests have none.
                if !lines.iter().any(|(name, _)| is_hop_by_hop(name)) {
                    return;
                }
                let keep: Vec<[u32; 4]> = {
                    let mut named: SmallVec<[&[u8]; 4]> = SmallVec::new();
                    for value in lines.get_all(&CONNECTION) {
                        for option in connection_options(value) {
                            if let ConnectionOption::Names(name) = option {
                                named.push(name);
                            }
                        }
                    }
                    let doomed = |name: &[u8]| {
                        is_hop_by_hop(name) || named.iter().any(|n| n.eq_ignore_ascii_case(name))
                    };
                    lines
                        .spans
                        .iter()
                        .filter(|s| !doomed(lines.name(s)))
                        .copied()
                        .collect()
                };
                lines.spans = keep;
            }
        }
    }
}

/// Header lines as an HTTP/1 head carries them, for tests: `text` is
/// `Name: value` lines, each ended by CRLF.
#[cfg(test)]
pub(crate) fn lines(text: &str) -> RequestHeaders {
    let head = Bytes::copy_from_slice(text.as_bytes());
    let mut lines = HeaderLines::new(head.clone(), 8);
    let mut at = 0;
    for line in text.split_terminator("\r\n") {
        let colon = line.find(':').expect("a colon");
        let value = line[colon + 1..].trim_start();
        let value_at = at + line.len() - value.len();
        lines
            .push(at..at + colon, value_at..value_at + value.len())
            .expect("in the head");
        at += line.len() + 2;
    }
    RequestHeaders::Lines(lines)
}

/// The values of the lines with one name.
pub struct LineValues<'a, 'n> {
    lines: &'a HeaderLines,
    spans: std::slice::Iter<'a, [u32; 4]>,
    /// The name, lower-case (a `HeaderName`'s).
    wanted: &'n [u8],
}

impl<'a> Iterator for LineValues<'a, '_> {
    type Item = &'a [u8];

    fn next(&mut self) -> Option<&'a [u8]> {
        let lines = self.lines;
        let wanted = self.wanted;
        self.spans
            .find(|s| lines.name(s).eq_ignore_ascii_case(wanted))
            .map(|s| lines.value(s))
    }
}

/// The values of one header, from either form.
pub enum Values<'a, 'n> {
    Lines(LineValues<'a, 'n>),
    Map(http::header::ValueIter<'a, HeaderValue>),
}

impl<'a> Iterator for Values<'a, '_> {
    type Item = &'a [u8];

    fn next(&mut self) -> Option<&'a [u8]> {
        match self {
            Values::Lines(it) => it.next(),
            Values::Map(it) => it.next().map(HeaderValue::as_bytes),
        }
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
    fn header_lines_are_found_by_name_in_any_case_and_kept_as_spelled() {
        let h = lines("Host: a\r\nX-A: 1\r\nx-a: 2\r\nAuthorization: Bearer t\r\n");
        assert_eq!(h.get(&http::header::HOST), Some(&b"a"[..]));
        let xa = HeaderName::from_static("x-a");
        assert_eq!(h.get_all(&xa).collect::<Vec<_>>(), [&b"1"[..], &b"2"[..]]);
        assert!(!h.contains(&http::header::CONTENT_LENGTH));
        assert_eq!(h.len(), 4);
        let mut seen = Vec::new();
        h.for_each(|n, v| {
            seen.push(format!(
                "{}={}",
                str::from_utf8(n).unwrap(),
                str::from_utf8(v).unwrap()
            ))
        });
        assert_eq!(seen, ["Host=a", "X-A=1", "x-a=2", "Authorization=Bearer t"]);
        assert_eq!(
            h.get_shared(&http::header::AUTHORIZATION).as_deref(),
            Some(&b"Bearer t"[..])
        );
    }

    #[test]
    fn hop_by_hop_lines_and_those_connection_names_are_dropped() {
        let mut h = lines(
            "Host: a\r\nConnection: keep-alive, X-Secret\r\nx-secret: 1\r\nKeep-Alive: 5\r\nTE: trailers\r\nProxy-Authorization: b\r\nX-Kept: 2\r\n",
        );
        h.strip_hop_by_hop();
        let mut seen = Vec::new();
        h.for_each(|n, _| seen.push(str::from_utf8(n).unwrap().to_string()));
        assert_eq!(seen, ["Host", "X-Kept"]);
    }

    #[test]
    fn a_header_added_to_lines_joins_them_in_a_map() {
        let mut h = lines("User-Agent: x\r\n");
        h.append(http::header::HOST, HeaderValue::from_static("example.org"));
        assert!(matches!(h, RequestHeaders::Map(_)));
        assert_eq!(h.get(&http::header::HOST), Some(&b"example.org"[..]));
        assert_eq!(h.get(&http::header::USER_AGENT), Some(&b"x"[..]));
    }
}

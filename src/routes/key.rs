//! Sticky keys: the part of a request that decides which worker of a pool
//! serves it. Extraction borrows from the request and never allocates.

use std::fmt;
use std::net::IpAddr;

use crate::request::RequestHeaders;
use base64::Engine;
use http::header::AUTHORIZATION;
use serde::{Deserialize, Serialize};

use crate::balancing::{key_hash, key_hash_percent_decoded, spread_key};

/// What a route sticks by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum KeyKind {
    /// The `{room}` path segment (room ID or alias).
    Room,
    /// The user an access token belongs to.
    User,
    /// The federation origin server.
    Origin,
    /// No stickiness: spread requests.
    None,
}

impl fmt::Display for KeyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            KeyKind::Room => "room",
            KeyKind::User => "user",
            KeyKind::Origin => "origin",
            KeyKind::None => "none",
        })
    }
}

/// A request's sticky key, borrowed from the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StickyKey<'a> {
    /// A room path segment as sent (possibly percent-encoded).
    Room(&'a str),
    /// The base64 localpart carried by a `syt_` access token.
    UserLocalpart(&'a str),
    /// Any other access token, hashed whole (possibly percent-encoded).
    Token(&'a str),
    /// The `origin` of an `Authorization: X-Matrix` header.
    Origin(&'a str),
    /// The client's address, when the request carries nothing better.
    ClientAddr(IpAddr),
    /// Spread: no stickiness.
    Spread,
}

impl StickyKey<'_> {
    /// The key's hash. Room IDs and tokens hash as if percent-decoded, so
    /// `%21a%3Ab` and `!a:b` are the same room.
    pub fn hash(&self) -> u64 {
        match self {
            StickyKey::Room(raw) | StickyKey::Token(raw) | StickyKey::UserLocalpart(raw) => {
                key_hash_percent_decoded(raw.as_bytes())
            }
            StickyKey::Origin(o) => key_hash(o.as_bytes()),
            StickyKey::ClientAddr(IpAddr::V4(a)) => key_hash(&a.octets()),
            StickyKey::ClientAddr(IpAddr::V6(a)) => key_hash(&a.octets()),
            StickyKey::Spread => spread_key(),
        }
    }

    /// A human description for `synapse-edge route`. Never shows a token.
    pub fn describe(&self) -> String {
        let decode = |s: &str| {
            percent_encoding::percent_decode_str(s)
                .decode_utf8_lossy()
                .into_owned()
        };
        match self {
            StickyKey::Room(raw) => format!("room {}", decode(raw)),
            StickyKey::UserLocalpart(b64) => {
                let b64 = decode(b64);
                match base64::engine::general_purpose::STANDARD_NO_PAD.decode(b64.as_bytes()) {
                    Ok(bytes) => format!("user @{}", String::from_utf8_lossy(&bytes)),
                    Err(_) => format!("user (token localpart {b64})"),
                }
            }
            StickyKey::Token(_) => "access token (not a syt_ token: hashed whole)".to_string(),
            StickyKey::Origin(o) => format!("origin server {o}"),
            StickyKey::ClientAddr(a) => format!("client address {a}"),
            StickyKey::Spread => "none (spread)".to_string(),
        }
    }
}

/// The parts of a request that key extraction reads.
#[derive(Debug, Clone, Copy)]
pub struct KeySource<'a> {
    pub query: Option<&'a str>,
    pub headers: &'a RequestHeaders,
    pub client: IpAddr,
}

/// The user key: the access token from `Authorization: Bearer`, else the
/// `access_token` query parameter; a `syt_` token yields its localpart.
pub fn user_key<'a>(src: &KeySource<'a>) -> StickyKey<'a> {
    let token = bearer_token(src.headers).or_else(|| query_param(src.query, "access_token"));
    match token {
        Some(t) if !t.is_empty() => match syt_localpart(t) {
            Some(local) => StickyKey::UserLocalpart(local),
            None => StickyKey::Token(t),
        },
        _ => StickyKey::ClientAddr(src.client),
    }
}

/// The origin key: `origin` from `Authorization: X-Matrix ...`, else the
/// client address.
pub fn origin_key<'a>(src: &KeySource<'a>) -> StickyKey<'a> {
    src.headers
        .get_all(&AUTHORIZATION)
        .filter_map(|v| std::str::from_utf8(v).ok())
        .find_map(x_matrix_origin)
        .map(StickyKey::Origin)
        .unwrap_or(StickyKey::ClientAddr(src.client))
}

fn bearer_token(headers: &RequestHeaders) -> Option<&str> {
    headers
        .get_all(&AUTHORIZATION)
        .filter_map(|v| std::str::from_utf8(v).ok())
        .find_map(|v| strip_scheme(v, "Bearer"))
}

/// Strips an auth scheme (case-insensitively) and the spaces after it.
fn strip_scheme<'a>(value: &'a str, scheme: &str) -> Option<&'a str> {
    let value = value.trim_start();
    let (head, rest) = value.split_at_checked(scheme.len())?;
    if !head.eq_ignore_ascii_case(scheme) || !rest.starts_with([' ', '\t']) {
        return None;
    }
    Some(rest.trim())
}

/// `syt_<base64 localpart>_<random>_<crc>`: standard base64 has no `_`, so
/// the localpart runs to the next `_`.
fn syt_localpart(token: &str) -> Option<&str> {
    let rest = token.strip_prefix("syt_")?;
    let end = memchr::memchr(b'_', rest.as_bytes())?;
    (end > 0).then(|| &rest[..end])
}

/// The raw value of the first `name` parameter in a query string.
/// One pass over the bytes: a `&str` split per pair cost several times
/// more, and /sync's routes ask twice per request.
pub fn query_param<'a>(query: Option<&'a str>, name: &str) -> Option<&'a str> {
    let query = query?;
    let (bytes, name) = (query.as_bytes(), name.as_bytes());
    let mut start = 0;
    while start <= bytes.len() {
        let end = memchr::memchr(b'&', &bytes[start..]).map_or(bytes.len(), |i| start + i);
        let pair = &bytes[start..end];
        if pair.starts_with(name) {
            match pair.get(name.len()) {
                None => return Some(""),
                Some(b'=') => return Some(&query[start + name.len() + 1..end]),
                Some(_) => {}
            }
        }
        start = end + 1;
    }
    None
}

/// `X-Matrix origin="a.org",destination="b.org",key="ed25519:x",sig="..."`.
fn x_matrix_origin(value: &str) -> Option<&str> {
    let params = strip_scheme(value, "X-Matrix")?;
    params.split(',').find_map(|p| {
        let (name, v) = p.split_once('=')?;
        if !name.trim().eq_ignore_ascii_case("origin") {
            return None;
        }
        let v = v.trim();
        let v = v
            .strip_prefix('"')
            .and_then(|v| v.strip_suffix('"'))
            .unwrap_or(v);
        (!v.is_empty()).then_some(v)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request::lines;

    fn src<'a>(headers: &'a RequestHeaders, query: Option<&'a str>) -> KeySource<'a> {
        KeySource {
            query,
            headers,
            client: "192.0.2.7".parse().unwrap(),
        }
    }

    #[test]
    fn syt_token_in_header_or_query_gives_the_same_user() {
        let h = lines("Authorization: Bearer syt_YWxpY2U_aBcDeFgHiJkLmNoPqRsT_0a1b2c\r\n");
        let from_header = user_key(&src(&h, None));
        let empty = lines("");
        let from_query = user_key(&src(
            &empty,
            Some("since=s1&access_token=syt_YWxpY2U_ZZZZZZZZZZZZZZZZZZZZ_0a1b2d"),
        ));
        assert_eq!(from_header, StickyKey::UserLocalpart("YWxpY2U"));
        assert_eq!(from_header.hash(), from_query.hash());
        assert_eq!(from_header.describe(), "user @alice");
    }

    #[test]
    fn header_token_wins_over_query_and_scheme_is_case_insensitive() {
        let h = lines("authorization: bearer   syt_Ym9i_x_y\r\n");
        let k = user_key(&src(&h, Some("access_token=syt_YWxpY2U_x_y")));
        assert_eq!(k, StickyKey::UserLocalpart("Ym9i"));
    }

    #[test]
    fn other_tokens_hash_whole_and_no_token_uses_client_address() {
        let h = lines("");
        let k = user_key(&src(&h, Some("access_token=mas_abcdef")));
        assert_eq!(k, StickyKey::Token("mas_abcdef"));
        assert!(
            !k.describe().contains("mas_abcdef"),
            "tokens are never shown"
        );
        let k = user_key(&src(&h, Some("since=x")));
        assert_eq!(k, StickyKey::ClientAddr("192.0.2.7".parse().unwrap()));
    }

    #[test]
    fn x_matrix_origin_quoted_or_not() {
        let h = lines(
            "Authorization: X-Matrix origin=\"remote.example\",destination=\"us.example\",key=\"ed25519:a\",sig=\"c2ln\"\r\n",
        );
        assert_eq!(
            origin_key(&src(&h, None)),
            StickyKey::Origin("remote.example")
        );
        // From hyper's map (an HTTP/2 request) as well.
        let mut map = http::HeaderMap::new();
        map.insert(
            AUTHORIZATION,
            http::HeaderValue::from_static(
                "X-Matrix key=\"ed25519:a\", Origin=other.example,sig=x",
            ),
        );
        let h = RequestHeaders::from(map);
        assert_eq!(
            origin_key(&src(&h, None)),
            StickyKey::Origin("other.example")
        );
        let empty = lines("");
        assert!(matches!(
            origin_key(&src(&empty, None)),
            StickyKey::ClientAddr(_)
        ));
    }

    #[test]
    fn query_param_takes_exact_names_only() {
        assert_eq!(query_param(Some("xsince=1&since=2"), "since"), Some("2"));
        assert_eq!(query_param(Some("since"), "since"), Some(""));
        assert_eq!(query_param(None, "since"), None);
        assert_eq!(
            query_param(Some("sincex=1&since=a=b&since=3"), "since"),
            Some("a=b")
        );
        assert_eq!(query_param(Some("a=1&&since=&b=2"), "since"), Some(""));
        assert_eq!(query_param(Some("a=1&since"), "since"), Some(""));
        assert_eq!(query_param(Some("a=1&"), "since"), None);
        assert_eq!(query_param(Some(""), "since"), None);
        assert_eq!(query_param(Some("=1&sinc=2"), "since"), None);
    }
}

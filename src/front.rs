//! What the edge answers or refuses itself, before routing: the traffic a
//! listener serves, `.well-known/matrix`, the admin guard, the HTTP→HTTPS
//! redirect and ACME challenges, and who the client really is (trusted
//! proxies).

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use http::header::{CONTENT_TYPE, HOST, HeaderValue, LOCATION};
use http::{Response, StatusCode};
use ipnet::IpNet;
use serde::Deserialize;

use crate::body::ResponseBody;
use crate::proxy::matrix_error;
use crate::request::{RequestHeaders, X_FORWARDED_FOR};

/// Kinds of traffic a listener may serve.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Traffic {
    /// The client-server API and everything else that is not federation or media.
    Client,
    /// `/_matrix/federation/` and `/_matrix/key/` (server-server API).
    Federation,
    /// `/_matrix/media/` (the legacy media API, used by clients and servers).
    Media,
}

impl Traffic {
    pub const ALL: [Traffic; 3] = [Traffic::Client, Traffic::Federation, Traffic::Media];

    /// The kind of a request path. `.well-known/matrix` is served everywhere.
    pub fn of(path: &str) -> Option<Traffic> {
        if path.starts_with("/.well-known/matrix/") {
            None
        } else if path.starts_with("/_matrix/federation/") || path.starts_with("/_matrix/key/") {
            Some(Traffic::Federation)
        } else if path.starts_with("/_matrix/media/") {
            Some(Traffic::Media)
        } else {
            Some(Traffic::Client)
        }
    }
}

/// What one listener is for.
#[derive(Debug, Clone)]
pub struct ListenerRole {
    /// The bound address, as metrics label it.
    pub name: String,
    pub serves: Vec<Traffic>,
    /// `Strict-Transport-Security` value to add to answers, if any.
    pub hsts: Option<HeaderValue>,
    /// Answer everything with a redirect to HTTPS (but ACME challenges).
    pub redirect_https: bool,
    pub acme_challenge_dir: Option<PathBuf>,
    /// Connections start with a PROXY protocol (v1 or v2) header.
    pub proxy_protocol: bool,
}

impl Default for ListenerRole {
    fn default() -> Self {
        ListenerRole {
            name: String::new(),
            serves: Traffic::ALL.to_vec(),
            hsts: None,
            redirect_https: false,
            acme_challenge_dir: None,
            proxy_protocol: false,
        }
    }
}

/// `.well-known/matrix` answers configured in edge.yaml.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct WellKnown {
    /// Body of `/.well-known/matrix/server`, e.g. `{"m.server": "matrix.example.org:443"}`.
    #[serde(default)]
    pub server: Option<serde_json::Value>,
    /// Body of `/.well-known/matrix/client`, e.g.
    /// `{"m.homeserver": {"base_url": "https://matrix.example.org"}}`.
    #[serde(default)]
    pub client: Option<serde_json::Value>,
}

impl WellKnown {
    /// The edge's own answer, when configured; `None` lets main answer.
    pub fn answer(&self, path: &str) -> Option<Response<ResponseBody>> {
        let (body, cors) = match path {
            "/.well-known/matrix/server" => (self.server.as_ref()?, false),
            "/.well-known/matrix/client" => (self.client.as_ref()?, true),
            _ => return None,
        };
        let mut r = Response::new(ResponseBody::full(body.to_string()));
        r.headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        if cors {
            r.headers_mut()
                .insert("access-control-allow-origin", HeaderValue::from_static("*"));
        }
        Some(r)
    }
}

/// Who may reach `/_synapse/admin/`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AdminGuard {
    /// Client networks allowed; default loopback only.
    #[serde(default = "loopback")]
    pub allow: Vec<IpNet>,
}

fn loopback() -> Vec<IpNet> {
    vec![
        IpNet::from(IpAddr::from([127, 0, 0, 1])),
        IpNet::from(IpAddr::from([0u16, 0, 0, 0, 0, 0, 0, 1])),
    ]
}

impl Default for AdminGuard {
    fn default() -> Self {
        AdminGuard { allow: loopback() }
    }
}

impl AdminGuard {
    /// A 403 when the request is for the admin API and the client may not
    /// reach it.
    pub fn check(&self, path: &str, client: IpAddr) -> Option<Response<ResponseBody>> {
        if !is_admin_path(path) || self.allow.iter().any(|n| n.contains(&client)) {
            return None;
        }
        Some(matrix_error(
            StatusCode::FORBIDDEN,
            "M_FORBIDDEN",
            "the admin API is not reachable from this address",
        ))
    }
}

/// The admin verdict for a path whose segments cannot change under
/// normalisation, read off its first two segments as they stand: `None`
/// when normalising could change them (a backslash, an empty or dot
/// segment, an escape in the first two segments, or one anywhere that
/// decodes to one of `./\\%`). One pass over the bytes, no allocation:
/// every request's path goes through here, and `%21room%3Aexample.org`
/// (third segment on) stays on this path.
fn plain_verdict(raw: &str) -> Option<bool> {
    let bytes = raw.as_bytes();
    // Where the first three `/` are: the first two segments lie between.
    let mut slash_at = [0usize; 3];
    let mut slashes = 0;
    let decoded = |h, l| hex(h).zip(hex(l)).map(|(h, l)| h << 4 | l);
    // Only `/`, `%` and `\\` can change a path under normalisation: the
    // bytes between are passed over with one table lookup each.
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        if !PATH_SPECIAL[usize::from(b)] {
            i += 1;
            continue;
        }
        match &bytes[i..] {
            // An empty or dot segment next.
            [b'/', b'/' | b'.', ..] => return None,
            [b'/', ..] => {
                if let Some(at) = slash_at.get_mut(slashes) {
                    *at = i;
                }
                slashes += 1;
            }
            [b'%', h, l, ..] if slashes >= 3 => match decoded(*h, *l) {
                Some(b'.' | b'/' | b'\\' | b'%') | None => return None,
                Some(_) => i += 2,
            },
            // An escape in the first two segments, a broken one, or `\\`.
            _ => return None,
        }
        i += 1;
    }
    let segment = |k: usize| {
        let end = if slashes > k + 1 {
            slash_at[k + 1]
        } else {
            bytes.len()
        };
        (slashes > k).then(|| &raw[slash_at[k] + 1..end])
    };
    Some(matches!((segment(0), segment(1)), (Some(a), Some(b))
        if a.eq_ignore_ascii_case("_synapse") && b.trim().eq_ignore_ascii_case("admin")))
}

/// The bytes `plain_verdict` stops at.
const PATH_SPECIAL: [bool; 256] = {
    let mut table = [false; 256];
    table[b'/' as usize] = true;
    table[b'%' as usize] = true;
    table[b'\\' as usize] = true;
    table
};

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Whether a raw path could reach Synapse's admin API. Decided on the path
/// normalised far beyond what Synapse does (percent-decoding until stable,
/// empty and `.` segments dropped, `..` applied, case folded), so that no
/// spelling of it slips past; refusing an odd path that would not have
/// reached the admin API costs nothing.
pub fn is_admin_path(raw: &str) -> bool {
    plain_verdict(raw).unwrap_or_else(|| normalised_is_admin(raw))
}

/// The admin verdict on the path normalised: percent-decoded until stable,
/// split on `/` and `\\`, empty and `.` segments dropped, `..` applied.
fn normalised_is_admin(raw: &str) -> bool {
    let mut path = raw.to_string();
    for _ in 0..4 {
        let decoded = percent_encoding::percent_decode_str(&path)
            .decode_utf8_lossy()
            .into_owned();
        if decoded == path {
            break;
        }
        path = decoded;
    }
    let mut segments: Vec<&str> = Vec::new();
    for seg in path.split(['/', '\\']) {
        match seg {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            s => segments.push(s),
        }
    }
    matches!(segments.as_slice(), [a, b, ..] if a.eq_ignore_ascii_case("_synapse") && b.trim().eq_ignore_ascii_case("admin"))
}

/// The answer of a redirect-only (plain HTTP) listener.
pub fn redirect_or_challenge(
    role: &ListenerRole,
    path_and_query: &str,
    headers: &RequestHeaders,
) -> Response<ResponseBody> {
    let path = path_and_query.split('?').next().unwrap_or("");
    if let (Some(dir), Some(token)) = (
        &role.acme_challenge_dir,
        path.strip_prefix("/.well-known/acme-challenge/"),
    ) {
        return acme_challenge(dir, token);
    }
    let host = headers
        .get(&HOST)
        .and_then(|h| std::str::from_utf8(h).ok())
        .map(strip_port)
        .filter(|h| {
            !h.is_empty()
                && h.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b".-[]:".contains(&b))
        });
    let Some(host) = host else {
        return matrix_error(
            StatusCode::BAD_REQUEST,
            "M_UNKNOWN",
            "a Host header is required",
        );
    };
    let location = format!("https://{host}{path_and_query}");
    let mut r = Response::new(ResponseBody::empty());
    *r.status_mut() = StatusCode::MOVED_PERMANENTLY;
    if let Ok(v) = HeaderValue::from_str(&location) {
        r.headers_mut().insert(LOCATION, v);
    }
    r
}

fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        return host
            .split_once(']')
            .map_or(host, |(h, _)| &host[..h.len() + 1]);
    }
    host.split(':').next().unwrap_or(host)
}

/// Serves a certbot webroot challenge file; tokens are base64url only.
fn acme_challenge(dir: &Path, token: &str) -> Response<ResponseBody> {
    let valid = !token.is_empty()
        && token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    match std::fs::read(dir.join(token)) {
        Ok(bytes) if valid => {
            let mut r = Response::new(ResponseBody::full(bytes));
            r.headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
            r
        }
        _ => matrix_error(StatusCode::NOT_FOUND, "M_NOT_FOUND", "no such challenge"),
    }
}

/// The client's address: the peer's, unless the peer is a trusted proxy,
/// in which case the right-most untrusted `X-Forwarded-For` entry.
pub fn client_address(peer: IpAddr, headers: &RequestHeaders, trusted: &[IpNet]) -> IpAddr {
    if trusted.is_empty() || !trusted.iter().any(|n| n.contains(&peer)) {
        return peer;
    }
    let mut client = peer;
    let entries: Vec<IpAddr> = headers
        .get_all(&X_FORWARDED_FOR)
        .filter_map(|v| std::str::from_utf8(v).ok())
        .flat_map(|v| v.split(','))
        .filter_map(|e| parse_forwarded_addr(e.trim()))
        .collect();
    for addr in entries.into_iter().rev() {
        client = addr;
        if !trusted.iter().any(|n| n.contains(&addr)) {
            break;
        }
    }
    client
}

fn parse_forwarded_addr(s: &str) -> Option<IpAddr> {
    s.parse::<IpAddr>()
        .ok()
        .or_else(|| s.parse::<std::net::SocketAddr>().ok().map(|a| a.ip()))
        .map(|a| a.to_canonical())
}

/// The v2 PROXY protocol signature.
const PROXY_V2: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";

/// Reads a PROXY protocol v1 or v2 header, exactly its bytes, and returns
/// the client address it carries (`None` for UNKNOWN/LOCAL).
pub async fn read_proxy_header<S: tokio::io::AsyncRead + Unpin>(
    stream: &mut S,
) -> std::io::Result<Option<IpAddr>> {
    use std::io::{Error, ErrorKind};
    use tokio::io::AsyncReadExt;
    let bad = |why: &str| Error::new(ErrorKind::InvalidData, why.to_string());
    // 12 bytes: shorter than any v1 header, so nothing past it is consumed.
    let mut head = vec![0u8; 12];
    stream.read_exact(&mut head).await?;
    if head.as_slice() == PROXY_V2 {
        let mut fixed = [0u8; 4];
        stream.read_exact(&mut fixed).await?;
        let len = u16::from_be_bytes([fixed[2], fixed[3]]) as usize;
        head.extend_from_slice(&fixed);
        let start = head.len();
        head.resize(start + len, 0);
        stream.read_exact(&mut head[start..]).await?;
        let header = ppp::v2::Header::try_from(head.as_slice())
            .map_err(|_| bad("invalid PROXY v2 header"))?;
        return Ok(match header.addresses {
            ppp::v2::Addresses::IPv4(a) => Some(IpAddr::V4(a.source_address)),
            ppp::v2::Addresses::IPv6(a) => Some(IpAddr::V6(a.source_address).to_canonical()),
            _ => None,
        });
    }
    if !head.starts_with(b"PROXY ") {
        return Err(bad("the connection did not start with a PROXY header"));
    }
    // v1: a text line of at most 107 bytes ending in CRLF.
    while !head.ends_with(b"\r\n") {
        if head.len() >= 107 {
            return Err(bad("PROXY v1 header too long"));
        }
        let mut b = [0u8; 1];
        stream.read_exact(&mut b).await?;
        head.push(b[0]);
    }
    let text = std::str::from_utf8(&head).map_err(|_| bad("invalid PROXY v1 header"))?;
    let header = ppp::v1::Header::try_from(text).map_err(|_| bad("invalid PROXY v1 header"))?;
    Ok(match header.addresses {
        ppp::v1::Addresses::Tcp4(a) => Some(IpAddr::V4(a.source_address)),
        ppp::v1::Addresses::Tcp6(a) => Some(IpAddr::V6(a.source_address).to_canonical()),
        ppp::v1::Addresses::Unknown => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_spelling_of_the_admin_api_is_caught() {
        for p in [
            "/_synapse/admin/v1/users",
            "/_synapse/admin",
            "//_synapse/admin/v1/users",
            "/_synapse//admin/v1/users",
            "/_synapse/./admin/v1/users",
            "/x/../_synapse/admin/v1/users",
            "/_synapse/%61dmin/v1/users",
            "/%5fsynapse/admin/v1/users",
            "/_synapse%2fadmin/v1/users",
            "/_synapse/%2561dmin/v1/users",
            "/_SYNAPSE/Admin/v1/users",
            "/_synapse/admin%20/v1",
            "/_synapse\\admin/v1",
            "/_synapse/x/../admin/v1/users",
            // Escaped dots and slashes deep in the path climb back up.
            "/_matrix/client/v3/rooms/%2e%2e/%2E%2E/%2e%2e/%2e%2e/_synapse/admin/v1/users",
            "/_matrix/client/%2F..%2F..%2F_synapse/admin/v1/users",
            "/_matrix/client/v3/rooms/%252e%252e/%2e%2e/%2e%2e/%2e%2e/_synapse/admin/v1",
            "/_matrix/client/v3/rooms/%zz/../../../../../_synapse/admin",
        ] {
            assert!(is_admin_path(p), "{p} slipped past");
        }
        for p in [
            "/_synapse/client/pick_idp",
            "/_matrix/client/v3/sync",
            "/_synapse/adminx",
            // A room ID's escapes leave the path's structure alone.
            "/_matrix/client/v3/rooms/%21room%3Aexample.org/messages",
            "/_matrix/client/v3/rooms/%21room%3Aexample.org/send/m.room.message/t%2Fx",
        ] {
            assert!(!is_admin_path(p), "{p} wrongly caught");
        }
    }

    /// The one-pass verdict is a shortcut, never a different answer: on
    /// paths built from the pieces that normalisation acts on, it agrees
    /// with full normalisation wherever it gives a verdict at all.
    #[test]
    fn the_plain_path_shortcut_agrees_with_full_normalisation() {
        const PIECES: [&str; 20] = [
            "/", "/", "/", ".", "..", "%2e", "%2E", "%2f", "%5C", "%25", "%5f", "%61", "%21",
            "%zz", "%", "_synapse", "admin", "ADMIN", " ", "x",
        ];
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = |n: usize| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % n as u64) as usize
        };
        let (mut judged, mut admin) = (0, 0);
        for _ in 0..50_000 {
            // A third of them start as the admin API does.
            let mut path = String::from(["/", "/_synapse/admin", "/_Synapse/ADMIN "][next(3)]);
            for _ in 0..next(9) {
                path.push_str(PIECES[next(PIECES.len())]);
            }
            if let Some(verdict) = plain_verdict(&path) {
                assert_eq!(verdict, normalised_is_admin(&path), "{path}");
                judged += 1;
                admin += usize::from(verdict);
            }
        }
        // The shortcut judged a good share, admin paths among them.
        assert!(
            judged > 5_000 && admin > 1_000,
            "{judged} judged, {admin} admin"
        );
    }

    #[test]
    fn forwarded_for_is_honoured_only_from_trusted_peers() {
        let trusted: Vec<IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        let h = crate::request::lines("X-Forwarded-For: 6.6.6.6, 198.51.100.7, 10.1.1.1\r\n");
        let from_lb = client_address("10.0.0.5".parse().unwrap(), &h, &trusted);
        assert_eq!(from_lb, "198.51.100.7".parse::<IpAddr>().unwrap());
        let direct = client_address("203.0.113.9".parse().unwrap(), &h, &trusted);
        assert_eq!(direct, "203.0.113.9".parse::<IpAddr>().unwrap());
        assert_eq!(
            client_address(
                "10.0.0.5".parse().unwrap(),
                &RequestHeaders::default(),
                &trusted
            ),
            "10.0.0.5".parse::<IpAddr>().unwrap()
        );
    }

    #[test]
    fn traffic_kinds() {
        assert_eq!(
            Traffic::of("/_matrix/federation/v1/send/1"),
            Some(Traffic::Federation)
        );
        assert_eq!(
            Traffic::of("/_matrix/key/v2/server"),
            Some(Traffic::Federation)
        );
        assert_eq!(
            Traffic::of("/_matrix/media/v3/upload"),
            Some(Traffic::Media)
        );
        assert_eq!(
            Traffic::of("/_matrix/client/v1/media/download/a/b"),
            Some(Traffic::Client)
        );
        assert_eq!(Traffic::of("/.well-known/matrix/server"), None);
    }
}

//! URL sources: a function input given as `{"url": "https://origin/photo.jpg"}` is fetched by
//! the node on the caller's behalf, so the request must not reach what the caller could not:
//! the host must be on the operator's allow-list (`--url-allow`, exact or `*.example.com`, with
//! an optional port), and every address the name resolves to must be public. Private,
//! loopback, link-local, CGNAT, multicast, documentation and reserved ranges, and IPv6 forms
//! that embed an IPv4 address (mapped, compatible, NAT64), are refused unless the operator
//! allows that range (`--url-allow-private 10.1.0.0/16`). The connection goes to the address
//! that was checked (no second lookup a rebinding DNS server could answer differently),
//! redirects are not followed, and the body is bounded by the function's input limit and a
//! deadline. `https` origins are verified against Mozilla's roots (compiled in, so the answer
//! does not depend on the host's certificate store) plus any the operator adds
//! (`--url-ca`), with rustls.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use axum::http::{StatusCode, Uri, header};
use http_body_util::{BodyExt, Empty, Limited};

use pixflow_runtime::InvokeError;

/// Why a URL was not fetched.
#[derive(Debug, thiserror::Error)]
pub(crate) enum FetchError {
    /// The URL is not one the node may fetch (its form, its host, an address it resolves to).
    #[error("{0}")]
    Refused(String),
    /// The origin failed, or answered other than `200 OK`.
    #[error("{0}")]
    Origin(String),
    #[error("the origin did not answer in time")]
    Timeout,
    /// The answer is larger than the function reads.
    #[error("the origin's answer is {size} bytes; this function reads at most {limit}")]
    TooLarge { size: String, limit: u64 },
    /// The node cannot hold the answer now.
    #[error(transparent)]
    Node(#[from] InvokeError),
}

impl FetchError {
    pub(crate) fn code(&self) -> &'static str {
        match self {
            FetchError::Refused(_) => "url_not_allowed",
            FetchError::Origin(_) => "origin_failed",
            FetchError::Timeout => "origin_timeout",
            FetchError::TooLarge { .. } => "origin_too_large",
            FetchError::Node(e) => e.code(),
        }
    }

    /// Whether fetching again could succeed.
    pub(crate) fn retryable(&self) -> bool {
        match self {
            FetchError::Origin(_) | FetchError::Timeout => true,
            FetchError::Refused(_) | FetchError::TooLarge { .. } => false,
            FetchError::Node(e) => e.retryable(),
        }
    }
}

const MAX_URL: usize = 2048;
const DEADLINE: Duration = Duration::from_secs(30);

/// A range of addresses (`10.0.0.0/8`, `fd00::/8`, `127.0.0.1`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    bits: u8,
}

impl std::str::FromStr for Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Cidr, String> {
        let (a, bits) = match s.split_once('/') {
            Some((a, b)) => (a, Some(b)),
            None => (s, None),
        };
        let addr: IpAddr = a.trim().parse().map_err(|_| format!("`{s}`: not an address"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let bits = match bits {
            None => max,
            Some(b) => b.trim().parse::<u8>().ok().filter(|b| *b <= max).ok_or_else(|| format!("`{s}`: bad prefix"))?,
        };
        Ok(Cidr { addr, bits })
    }
}

impl Cidr {
    fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => prefix_eq(&net.octets(), &ip.octets(), self.bits),
            (IpAddr::V6(net), IpAddr::V6(ip)) => prefix_eq(&net.octets(), &ip.octets(), self.bits),
            _ => false,
        }
    }
}

fn prefix_eq(a: &[u8], b: &[u8], bits: u8) -> bool {
    let (whole, rest) = (usize::from(bits / 8), bits % 8);
    if a[..whole] != b[..whole] {
        return false;
    }
    rest == 0 || (a[whole] ^ b[whole]) >> (8 - rest) == 0
}

/// Whether an address is on the public internet (RFC 6890's special-purpose ranges are not).
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_public_v4(v4),
        IpAddr::V6(v6) => is_public_v6(v6),
    }
}

fn is_public_v4(ip: Ipv4Addr) -> bool {
    let o = ip.octets();
    !(ip.is_unspecified()
        || o[0] == 0
        || ip.is_private()
        || ip.is_loopback()
        || ip.is_link_local()
        || (o[0] == 100 && (o[1] & 0xc0) == 64)
        || (o[0] == 192 && o[1] == 0 && o[2] == 0)
        || ip.is_documentation()
        || (o[0] == 198 && (o[1] & 0xfe) == 18)
        || ip.is_multicast()
        || o[0] >= 240)
}

fn is_public_v6(ip: Ipv6Addr) -> bool {
    let s = ip.segments();
    !(ip.is_unspecified()
        || ip.is_loopback()
        // IPv4-mapped ::ffff:0:0/96 and IPv4-compatible ::/96: an IPv4 address in disguise.
        || (s[0..5] == [0, 0, 0, 0, 0] && (s[5] == 0xffff || s[5] == 0))
        // NAT64 64:ff9b::/96 and 64:ff9b:1::/48.
        || (s[0] == 0x64 && s[1] == 0xff9b)
        || (s[0] & 0xfe00) == 0xfc00
        || (s[0] & 0xffc0) == 0xfe80
        || (s[0] & 0xff00) == 0xff00
        || (s[0] == 0x2001 && s[1] == 0x0db8)
        // Teredo 2001::/32 embeds an IPv4 address; site-local fec0::/10; discard-only 100::/64.
        || (s[0] == 0x2001 && s[1] == 0)
        || (s[0] & 0xffc0) == 0xfec0
        || (s[0] == 0x100 && s[1..4] == [0, 0, 0])
        // 2002::/16 (6to4) embeds an IPv4 address too.
        || s[0] == 0x2002)
}

/// What the operator allows URL sources to reach.
#[derive(Debug, Clone, Default)]
pub struct UrlPolicy {
    /// `host`, `host:port`, `*.example.com` or `*.example.com:port` (lowercase).
    pub hosts: Vec<String>,
    /// Non-public ranges that may still be reached.
    pub private: Vec<Cidr>,
    /// Whom `https` origins are verified against.
    pub tls: Tls,
}

/// The TLS client of `https` origins: Mozilla's roots and the operator's own.
#[derive(Clone)]
pub struct Tls(std::sync::Arc<rustls::ClientConfig>);

impl Default for Tls {
    fn default() -> Tls {
        Tls::with_roots(&[]).expect("Mozilla's roots are valid")
    }
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Tls")
    }
}

impl Tls {
    /// Trusts Mozilla's roots and the certificates in `pem` (PEM, any number of them).
    pub fn with_roots(pem: &[u8]) -> Result<Tls, String> {
        use rustls::pki_types::CertificateDer;
        use rustls::pki_types::pem::PemObject;
        let mut roots = rustls::RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() };
        let mut added = 0;
        for cert in CertificateDer::pem_slice_iter(pem) {
            let cert = cert.map_err(|e| format!("not a PEM certificate: {e}"))?;
            roots.add(cert).map_err(|e| format!("not a CA certificate: {e}"))?;
            added += 1;
        }
        if !pem.is_empty() && added == 0 {
            return Err("no certificate in the file".into());
        }
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Tls(std::sync::Arc::new(config)))
    }
}

/// A checked URL: where to connect and what to ask.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Target {
    pub(crate) tls: bool,
    pub(crate) host: String,
    pub(crate) port: u16,
    pub(crate) path: String,
}

fn refuse(why: impl Into<String>) -> FetchError {
    FetchError::Refused(why.into())
}

impl UrlPolicy {
    fn host_allowed(&self, host: &str, port: u16) -> bool {
        self.hosts.iter().any(|entry| {
            // `host`, `host:port`, `[v6]`, `[v6]:port`, or a bare IPv6 address.
            let (pattern, p) = match entry.strip_prefix('[').and_then(|e| e.split_once(']')) {
                Some((h, rest)) => (h, rest.strip_prefix(':').and_then(|p| p.parse::<u16>().ok())),
                None => match entry.rsplit_once(':') {
                    Some((h, p)) if !h.contains(':') => (h, p.parse::<u16>().ok()),
                    _ => (entry.as_str(), None),
                },
            };
            let port_ok = p.is_none_or(|p| p == port);
            let host_ok = match pattern.strip_prefix("*.") {
                Some(suffix) => host.len() > suffix.len() + 1 && host.ends_with(&format!(".{suffix}")),
                None => host == pattern,
            };
            port_ok && host_ok
        })
    }

    fn address_allowed(&self, ip: IpAddr) -> bool {
        is_public(ip) || self.private.iter().any(|c| c.contains(ip))
    }

    /// Checks a URL against the host allow-list (no I/O): where to connect and what to ask.
    pub(crate) fn check(&self, url: &str) -> Result<Target, FetchError> {
        if url.len() > MAX_URL {
            return Err(refuse(format!("the URL is longer than {MAX_URL} characters")));
        }
        let uri: Uri = url.parse().map_err(|_| refuse("not a URL"))?;
        let tls = match uri.scheme_str() {
            Some("http") => false,
            Some("https") => true,
            _ => return Err(refuse("only http:// and https:// URLs are fetched")),
        };
        let authority = uri.authority().ok_or_else(|| refuse("the URL names no host"))?;
        if authority.as_str().contains('@') {
            return Err(refuse("URLs carry no credentials"));
        }
        let host = authority.host().trim_start_matches('[').trim_end_matches(']').to_ascii_lowercase();
        let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
        if self.hosts.is_empty() {
            return Err(refuse("URL sources are off on this node (the operator enables them with --url-allow)"));
        }
        if !self.host_allowed(&host, port) {
            return Err(refuse(format!("`{host}:{port}` is not an allowed origin")));
        }
        let path = uri.path_and_query().map_or("/", |p| p.as_str()).to_owned();
        Ok(Target { tls, host, port, path })
    }

    /// Resolves the host and checks every address; returns one to connect to.
    async fn resolve(&self, host: &str, port: u16) -> Result<SocketAddr, FetchError> {
        let addrs: Vec<SocketAddr> = match host.parse::<IpAddr>() {
            Ok(ip) => vec![SocketAddr::new(ip, port)],
            Err(_) => tokio::time::timeout(Duration::from_secs(5), tokio::net::lookup_host((host, port)))
                .await
                .map_err(|_| origin("resolving the host timed out"))?
                .map_err(|e| origin(format!("resolving `{host}`: {e}")))?
                .collect(),
        };
        if addrs.is_empty() {
            return Err(origin(format!("`{host}` resolves to no address")));
        }
        // Every address must pass: a name that also points inside is refused whole.
        if let Some(bad) = addrs.iter().find(|a| !self.address_allowed(a.ip())) {
            return Err(refuse(format!("`{host}` resolves to {}, which is not a public address", bad.ip())));
        }
        Ok(addrs[0])
    }
}

fn origin(why: impl Into<String>) -> FetchError {
    FetchError::Origin(why.into())
}

/// Fetches a URL source: at most `limit` bytes, within the deadline. `reserve` is told how
/// many bytes the body will hold (its declared length, else the limit) before it is read.
pub(crate) async fn fetch(
    policy: &UrlPolicy,
    url: &str,
    limit: u64,
    reserve: &mut (dyn FnMut(u64) -> Result<(), InvokeError> + Send),
) -> Result<Vec<u8>, FetchError> {
    let Target { tls, host, port, path } = policy.check(url)?;
    let work = async {
        let addr = policy.resolve(&host, port).await?;
        let stream =
            tokio::net::TcpStream::connect(addr).await.map_err(|e| origin(format!("connecting to {addr}: {e}")))?;
        let name = if host.contains(':') { format!("[{host}]") } else { host.clone() };
        let host_header = if port == if tls { 443 } else { 80 } { name } else { format!("{name}:{port}") };
        let req = hyper::Request::get(&path)
            .header(header::HOST, host_header)
            .header(header::USER_AGENT, concat!("pixflow/", env!("CARGO_PKG_VERSION")))
            .body(Empty::<bytes::Bytes>::new())
            .map_err(|e| refuse(format!("the URL's path: {e}")))?;
        let resp = if tls {
            // The certificate must name the host of the URL (not the address it resolved to).
            let server = rustls::pki_types::ServerName::try_from(host.clone())
                .map_err(|_| refuse(format!("`{host}` is not a name a certificate can carry")))?;
            let stream = tokio_rustls::TlsConnector::from(policy.tls.0.clone())
                .connect(server, stream)
                .await
                .map_err(|e| origin(format!("TLS with {host} ({addr}): {e}")))?;
            send(stream, req, addr).await?
        } else {
            send(stream, req, addr).await?
        };
        let status = resp.status();
        if status.is_redirection() {
            return Err(origin(format!("the origin answered {status}; redirects are not followed")));
        }
        if status != StatusCode::OK {
            return Err(origin(format!("the origin answered {status}")));
        }
        let declared = resp.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        let too_large = |size: String| FetchError::TooLarge { size, limit };
        if let Some(n) = declared.filter(|n| *n > limit) {
            return Err(too_large(n.to_string()));
        }
        reserve(declared.unwrap_or(limit))?;
        let body = Limited::new(resp.into_body(), usize::try_from(limit).unwrap_or(usize::MAX));
        match body.collect().await {
            Ok(b) => Ok(b.to_bytes().to_vec()),
            Err(e) if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() => {
                Err(too_large(format!("more than {limit}")))
            }
            Err(e) => Err(origin(format!("reading the origin's answer: {e}"))),
        }
    };
    tokio::time::timeout(DEADLINE, work).await.map_err(|_| FetchError::Timeout)?
}

/// Sends one request over a connection (HTTP/1.1).
async fn send(
    io: impl tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    req: hyper::Request<Empty<bytes::Bytes>>,
    addr: SocketAddr,
) -> Result<hyper::Response<hyper::body::Incoming>, FetchError> {
    let (mut sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(io))
        .await
        .map_err(|e| origin(format!("talking to {addr}: {e}")))?;
    tokio::spawn(conn);
    sender.send_request(req).await.map_err(|e| origin(format!("requesting from {addr}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn special_purpose_addresses_are_not_public() {
        for ip in [
            "10.1.2.3",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "127.0.0.1",
            "0.0.0.0",
            "0.1.2.3",
            "169.254.169.254",
            "100.64.0.1",
            "100.127.255.255",
            "192.0.0.8",
            "192.0.2.1",
            "198.18.0.1",
            "198.51.100.7",
            "203.0.113.9",
            "224.0.0.1",
            "240.0.0.1",
            "255.255.255.255",
            "::",
            "::1",
            "::ffff:127.0.0.1",
            "::ffff:8.8.8.8",
            "::127.0.0.1",
            "64:ff9b::a9fe:a9fe",
            "fc00::1",
            "fd12::1",
            "fe80::1",
            "ff02::1",
            "2001:db8::1",
            "2002:a9fe:a9fe::1",
        ] {
            assert!(!is_public(ip.parse().unwrap()), "{ip}");
        }
        for ip in ["8.8.8.8", "1.1.1.1", "100.128.0.1", "172.32.0.1", "2606:4700::1111", "2a00:1450::1"] {
            assert!(is_public(ip.parse().unwrap()), "{ip}");
        }
    }

    #[test]
    fn ranges_parse_and_match() {
        let c: Cidr = "10.1.0.0/16".parse().unwrap();
        assert!(c.contains("10.1.255.1".parse().unwrap()) && !c.contains("10.2.0.1".parse().unwrap()));
        let one: Cidr = "127.0.0.1".parse().unwrap();
        assert!(one.contains("127.0.0.1".parse().unwrap()) && !one.contains("127.0.0.2".parse().unwrap()));
        let v6: Cidr = "fd00::/8".parse().unwrap();
        assert!(v6.contains("fd12::1".parse().unwrap()) && !v6.contains("10.0.0.1".parse().unwrap()));
        let odd: Cidr = "172.16.0.0/12".parse().unwrap();
        assert!(odd.contains("172.31.0.1".parse().unwrap()) && !odd.contains("172.32.0.1".parse().unwrap()));
        for bad in ["10.0.0.0/33", "nope", "::/129"] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad}");
        }
    }

    #[test]
    fn urls_are_checked_against_the_allow_list() {
        let p = UrlPolicy {
            hosts: vec!["images.example.com".into(), "*.cdn.example.org:8080".into()],
            ..Default::default()
        };
        let target = |tls, port, path: &str| Target { tls, host: "images.example.com".into(), port, path: path.into() };
        assert_eq!(p.check("http://images.example.com/a.jpg?x=1").unwrap(), target(false, 80, "/a.jpg?x=1"));
        assert_eq!(p.check("https://images.example.com/a.jpg").unwrap(), target(true, 443, "/a.jpg"));
        assert!(p.check("https://images.example.com:8443/").is_ok());
        assert!(p.check("http://a.cdn.example.org:8080/b").is_ok());
        for (bad, code) in [
            ("http://evil.example.com/a.jpg", "url_not_allowed"),
            ("http://cdn.example.org:8080/b", "url_not_allowed"),
            ("http://a.cdn.example.org/b", "url_not_allowed"),
            ("http://user:pw@images.example.com/", "url_not_allowed"),
            ("ftp://images.example.com/", "url_not_allowed"),
            ("file:///etc/passwd", "url_not_allowed"),
            ("https://evil.example.com/", "url_not_allowed"),
            ("not a url", "url_not_allowed"),
        ] {
            assert_eq!(p.check(bad).unwrap_err().code(), code, "{bad}");
        }
        let v6 =
            UrlPolicy { hosts: vec!["[2606:4700::1111]:8080".into(), "2a00:1450::1".into()], ..Default::default() };
        assert!(v6.check("http://[2606:4700::1111]:8080/a").is_ok());
        assert!(v6.check("http://[2606:4700::1111]/a").is_err());
        assert!(v6.check("http://[2a00:1450::1]:9000/a").is_ok());
        assert!(Tls::with_roots(b"").is_ok());
        assert!(Tls::with_roots(b"not a certificate").is_err());
        assert!(Tls::with_roots(b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n").is_err());
        let off = UrlPolicy::default();
        assert!(off.check("http://images.example.com/").unwrap_err().to_string().contains("--url-allow"));
    }
}

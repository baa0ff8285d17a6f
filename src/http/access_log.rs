//! Access logs: the client address from X-Forwarded-For / X-Real-IP only when
//! the peer is a trusted proxy, and never a token (`token=` is redacted; the
//! Authorization header is not logged).

use std::net::IpAddr;
use std::sync::Arc;

use actix_web::dev::ServiceRequest;
use actix_web::middleware::Logger;

/// The client's address: the peer, or what a trusted proxy says it is.
pub fn client_ip(req: &actix_web::HttpRequest, trusted: &[IpAddr]) -> Option<IpAddr> {
    let peer = req.peer_addr()?.ip();
    if !trusted.contains(&peer) {
        return Some(peer);
    }
    let headers = req.headers();
    // The right-most X-Forwarded-For entry not itself a trusted proxy is the client.
    if let Some(xff) = headers.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
        let hop = xff
            .split(',')
            .rev()
            .filter_map(|s| s.trim().parse::<IpAddr>().ok())
            .find(|ip| !trusted.contains(ip));
        if hop.is_some() {
            return hop;
        }
    }
    headers
        .get("x-real-ip")
        .and_then(|v| v.to_str().ok())
        .and_then(|s| s.trim().parse().ok())
        .or(Some(peer))
}

/// The request line with any `token` query parameter redacted.
pub fn redacted_request_line(req: &ServiceRequest) -> String {
    let path = req.path();
    let query = req.query_string();
    let query: Vec<String> = query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, _)) if k == "token" || k == "access_token" => format!("{k}=REDACTED"),
            _ => p.to_string(),
        })
        .collect();
    let q = if query.is_empty() {
        String::new()
    } else {
        format!("?{}", query.join("&"))
    };
    format!("{} {path}{q} {:?}", req.method(), req.version())
}

pub fn logger(trusted: Arc<Vec<IpAddr>>) -> Logger {
    Logger::new("%{client}xi \"%{request}xi\" %s %b %Dms")
        .custom_request_replace("client", move |req| {
            client_ip(req.request(), &trusted)
                .map(|ip| ip.to_string())
                .unwrap_or_else(|| "-".into())
        })
        .custom_request_replace("request", redacted_request_line)
}

#[cfg(test)]
mod tests {
    use super::*;
    use actix_web::test::TestRequest;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn forwarded_headers_count_only_from_trusted_proxies() {
        let trusted = [ip("10.0.0.1")];
        let direct = TestRequest::default()
            .peer_addr("203.0.113.9:5000".parse().unwrap())
            .insert_header(("X-Forwarded-For", "198.51.100.1"))
            .to_http_request();
        assert_eq!(
            client_ip(&direct, &trusted),
            Some(ip("203.0.113.9")),
            "an untrusted peer cannot claim an address"
        );
        let proxied = TestRequest::default()
            .peer_addr("10.0.0.1:5000".parse().unwrap())
            .insert_header(("X-Forwarded-For", "1.2.3.4, 198.51.100.1, 10.0.0.1"))
            .to_http_request();
        assert_eq!(
            client_ip(&proxied, &trusted),
            Some(ip("198.51.100.1")),
            "the right-most untrusted hop"
        );
        let real_ip = TestRequest::default()
            .peer_addr("10.0.0.1:5000".parse().unwrap())
            .insert_header(("X-Real-IP", "198.51.100.2"))
            .to_http_request();
        assert_eq!(client_ip(&real_ip, &trusted), Some(ip("198.51.100.2")));
    }

    #[test]
    fn tokens_never_reach_the_log() {
        let req = TestRequest::get()
            .uri("/ws?x=1&token=eyJhbGciOi.secret.sig&y=2")
            .to_srv_request();
        let line = redacted_request_line(&req);
        assert!(line.starts_with("GET /ws?x=1&token=REDACTED&y=2"), "{line}");
        assert!(!line.contains("secret"));
    }
}

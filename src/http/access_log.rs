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

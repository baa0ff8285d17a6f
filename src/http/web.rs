//! The browser client, embedded in the binary (web/ at build time).

use actix_web::HttpResponse;

const INDEX: &str = include_str!("../../web/index.html");
const APP_JS: &str = include_str!("../../web/app.js");
const STYLE: &str = include_str!("../../web/style.css");

fn file(body: &'static str, content_type: &str) -> HttpResponse {
    HttpResponse::Ok()
        .content_type(content_type)
        .insert_header(("Cache-Control", "no-cache"))
        .insert_header(("X-Content-Type-Options", "nosniff"))
        .body(body)
}

pub async fn index() -> HttpResponse {
    let mut r = file(INDEX, "text/html; charset=utf-8");
    r.headers_mut().insert(
        actix_web::http::header::CONTENT_SECURITY_POLICY,
        actix_web::http::header::HeaderValue::from_static(
            "default-src 'self'; connect-src 'self' ws: wss:; img-src 'self' data:; style-src 'self'; script-src 'self'",
        ),
    );
    r
}

pub async fn app_js() -> HttpResponse {
    file(APP_JS, "text/javascript; charset=utf-8")
}

pub async fn style_css() -> HttpResponse {
    file(STYLE, "text/css; charset=utf-8")
}

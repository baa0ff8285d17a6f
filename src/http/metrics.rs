//! `GET /metrics`: Prometheus text exposition format.

use actix_web::{web, HttpResponse};

use super::AppState;
use crate::metrics::METRICS;

#[utoipa::path(get, path = "/metrics", tag = "health", responses((status = 200, description = "Prometheus text exposition format", content_type = "text/plain; version=0.0.4", body = String)))]
pub async fn metrics(state: web::Data<AppState>) -> HttpResponse {
    let s = state.pool.state();
    let body = METRICS.render(Some((
        s.connections,
        s.idle_connections,
        state.pool.max_size(),
    )));
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4")
        .body(body)
}

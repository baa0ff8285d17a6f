//! `GET /healthz` (the process runs) and `GET /readyz` (the database answers).

use actix_web::{web, HttpResponse};

use super::AppState;
use crate::error::ChatError;

#[utoipa::path(get, path = "/healthz", tag = "health", responses((status = 200, description = "the process runs")))]
pub async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(serde_json::json!({"status": "ok"}))
}

/// Checked on a pool connection of its own (not through the DbExecutor, whose
/// threads may all be waiting on a slow database), bounded by the pool timeout.
#[utoipa::path(get, path = "/readyz", tag = "health", responses((status = 200, description = "the database answers"), (status = 503, description = "the database does not answer", body = super::openapi::ErrorBody)))]
pub async fn readyz(state: web::Data<AppState>) -> Result<HttpResponse, ChatError> {
    let pool = state.pool.clone();
    let res = web::block(move || -> Result<(), ChatError> {
        use diesel::RunQueryDsl;
        let mut c = pool.get()?;
        diesel::sql_query("SELECT 1").execute(&mut *c)?;
        Ok(())
    })
    .await
    .map_err(|e| ChatError::unavailable(e.to_string()))?;
    res.map_err(|_| ChatError::unavailable("the database is not answering"))?;
    Ok(HttpResponse::Ok().json(serde_json::json!({"status": "ready"})))
}

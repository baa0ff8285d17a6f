//! Prometheus metrics of the process, rendered by `GET /metrics`.

use std::sync::LazyLock;

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

pub struct Metrics {
    registry: Registry,
    /// Open WebSocket connections.
    pub connections: IntGauge,
    /// Sessions by state: `syncing` (sending the backlog) or `live`.
    pub sessions: IntGaugeVec,
    pub messages_stored: IntCounter,
    /// Live `message` frames queued to sessions.
    pub messages_delivered: IntCounter,
    /// `message` frames sent from backlogs on connect.
    pub backlog_sent: IntCounter,
    /// Frames and requests refused, by error code.
    pub rejected: IntCounterVec,
    pub rate_limited: IntCounter,
    pub evictions: IntCounter,
    /// Database operation latency by operation.
    pub db_seconds: HistogramVec,
    pub pool_connections: IntGauge,
    pub pool_idle: IntGauge,
    pub pool_max: IntGauge,
    /// Requests from sessions and the API sent to the ChatServer and not yet handled.
    pub server_mailbox: IntGauge,
    /// Sends and group changes waiting for their lane's transaction.
    pub queued_writes: IntGauge,
    /// `chat_hub_node_info{node}` 1: this node's id (set at start).
    pub node_info: IntGaugeVec,
    /// 1 while connected to the cluster's Redis, 0 otherwise (and standalone).
    pub bus_up: IntGauge,
    /// Other nodes of the cluster heard from lately.
    pub cluster_nodes: IntGauge,
    pub bus_published: IntCounter,
    pub bus_received: IntCounter,
    /// Bus messages not published: Redis down or the outbound queue full.
    pub bus_dropped: IntCounter,
    /// Messages fetched from the database to fill a gap in a conversation's live order.
    pub gap_fills: IntCounter,
}

fn counter(r: &Registry, name: &str, help: &str) -> IntCounter {
    let c = IntCounter::new(name, help).expect("valid metric");
    r.register(Box::new(c.clone())).expect("registered once");
    c
}

fn gauge(r: &Registry, name: &str, help: &str) -> IntGauge {
    let g = IntGauge::new(name, help).expect("valid metric");
    r.register(Box::new(g.clone())).expect("registered once");
    g
}

impl Metrics {
    fn new() -> Self {
        let r = Registry::new();
        let sessions = IntGaugeVec::new(
            Opts::new("chat_hub_sessions", "WebSocket sessions by state"),
            &["state"],
        )
        .expect("valid metric");
        r.register(Box::new(sessions.clone()))
            .expect("registered once");
        let rejected = IntCounterVec::new(
            Opts::new(
                "chat_hub_rejected_total",
                "Frames and API requests refused, by error code",
            ),
            &["code"],
        )
        .expect("valid metric");
        r.register(Box::new(rejected.clone()))
            .expect("registered once");
        let db_seconds = HistogramVec::new(
            HistogramOpts::new(
                "chat_hub_db_operation_seconds",
                "Database operation latency, pool wait included",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
            ]),
            &["op"],
        )
        .expect("valid metric");
        r.register(Box::new(db_seconds.clone()))
            .expect("registered once");
        let node_info = IntGaugeVec::new(
            Opts::new("chat_hub_node_info", "This node's id (always 1)"),
            &["node"],
        )
        .expect("valid metric");
        r.register(Box::new(node_info.clone()))
            .expect("registered once");
        Metrics {
            node_info,
            bus_up: gauge(
                &r,
                "chat_hub_cluster_bus_up",
                "1 while connected to the cluster's Redis",
            ),
            cluster_nodes: gauge(
                &r,
                "chat_hub_cluster_nodes",
                "Other nodes of the cluster heard from in the last 15 s",
            ),
            bus_published: counter(
                &r,
                "chat_hub_cluster_published_total",
                "Messages published on the cluster bus",
            ),
            bus_received: counter(
                &r,
                "chat_hub_cluster_received_total",
                "Messages received from the cluster bus",
            ),
            bus_dropped: counter(
                &r,
                "chat_hub_cluster_dropped_total",
                "Bus messages not published (Redis down or queue full)",
            ),
            gap_fills: counter(
                &r,
                "chat_hub_cluster_gap_fills_total",
                "Messages read from the database to fill a gap in live order",
            ),
            connections: gauge(
                &r,
                "chat_hub_connections_open",
                "Open WebSocket connections",
            ),
            sessions,
            messages_stored: counter(
                &r,
                "chat_hub_messages_stored_total",
                "Messages committed to the database",
            ),
            messages_delivered: counter(
                &r,
                "chat_hub_messages_delivered_total",
                "Live message frames queued to sessions",
            ),
            backlog_sent: counter(
                &r,
                "chat_hub_backlog_messages_sent_total",
                "Message frames sent from backlogs on connect",
            ),
            rejected,
            rate_limited: counter(
                &r,
                "chat_hub_rate_limited_total",
                "Sends refused for the per-user rate",
            ),
            evictions: counter(
                &r,
                "chat_hub_slow_consumer_evictions_total",
                "Sessions disconnected because their outbound queue was full",
            ),
            db_seconds,
            pool_connections: gauge(
                &r,
                "chat_hub_db_pool_connections",
                "Database connections open in the pool",
            ),
            pool_idle: gauge(
                &r,
                "chat_hub_db_pool_idle",
                "Idle database connections in the pool",
            ),
            pool_max: gauge(&r, "chat_hub_db_pool_max", "Pool size limit"),
            server_mailbox: gauge(
                &r,
                "chat_hub_server_mailbox_depth",
                "Requests waiting in the ChatServer's mailbox",
            ),
            queued_writes: gauge(
                &r,
                "chat_hub_queued_writes",
                "Sends and group changes waiting for a database transaction",
            ),
            registry: r,
        }
    }

    /// The text exposition format, with the pool's state read now.
    pub fn render(&self, pool: Option<(u32, u32, u32)>) -> String {
        if let Some((conns, idle, max)) = pool {
            self.pool_connections.set(conns as i64);
            self.pool_idle.set(idle as i64);
            self.pool_max.set(max as i64);
        }
        let mut buf = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut buf) {
            log::warn!("metrics encoding: {e}");
        }
        String::from_utf8(buf).unwrap_or_default()
    }
}

/// The process's metrics.
pub static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

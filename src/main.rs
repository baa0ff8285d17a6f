//! The `chat-hub` command: parse the command line, load the configuration, run.

use std::process::ExitCode;

use chat_hub::auth::TokenKeys;
use chat_hub::config::{self, Config};
use chat_hub::ids::UserId;

fn main() -> ExitCode {
    let matches = config::command().get_matches();
    let mut cfg = match Config::load(&matches) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("chat-hub: configuration refused: {e}");
            return ExitCode::from(2);
        }
    };
    init_logging(&cfg.node_id);
    if let Some(("token", m)) = matches.subcommand() {
        let user = m
            .get_one::<String>("user")
            .map(String::as_str)
            .unwrap_or_default();
        let ttl = m.get_one::<u64>("ttl_secs").copied().unwrap_or(86_400);
        let minted = UserId::parse(user).and_then(|u| {
            cfg.resolve_jwt_secret()
                .and_then(|s| TokenKeys::new(&s).mint(&u, ttl))
        });
        return match minted {
            Ok(token) => {
                println!("{token}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("chat-hub token: {e}");
                ExitCode::from(2)
            }
        };
    }
    match actix_web::rt::System::new().block_on(chat_hub::app::run(cfg)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("chat-hub: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// env_logger's format with this node's id in every line (`RUST_LOG` as usual).
fn init_logging(node: &str) {
    use std::io::Write;
    let node = node.to_string();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format(move |buf, record| {
            writeln!(
                buf,
                "[{} {:<5} {} {}] {}",
                buf.timestamp_millis(),
                record.level(),
                node,
                record.target(),
                record.args()
            )
        })
        .init();
}

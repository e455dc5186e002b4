use clap::Parser;

// Allocation-heavy work (JSON, futures) runs markedly faster than on glibc malloc, and
// jemalloc beats mimalloc here: under AI actions mimalloc's malloc fast path took a
// seventh of the process (cache misses on blocks freed by the other worker thread);
// with jemalloc the process spends about a fifth less CPU per request
// (docs/benchmarks.md, "AI actions").
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = crm_api::cli::Cli::parse();
    crm_api::telemetry::init();
    crm_api::cli::run(cli, shutdown_signal()).await
}

/// Resolves on SIGINT (Ctrl-C) or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        if let Ok(mut s) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        {
            s.recv().await;
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    tracing::info!("shutdown requested");
}

#![forbid(unsafe_code)]

#[tokio::main]
async fn main() -> std::process::ExitCode {
    match herald::cli::run().await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

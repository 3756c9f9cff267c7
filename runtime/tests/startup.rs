//! What every binary relies on at start-up, checked in a real process.

use std::time::Duration;

use clap::ValueEnum;
use kanava_runtime::LogFormat;

#[test]
fn the_open_file_limit_is_raised_to_the_hard_limit() {
    use rustix::process::{Resource, getrlimit};
    let soft = kanava_runtime::raise_fd_limit();
    let limit = getrlimit(Resource::Nofile);
    assert_eq!(soft, limit.current);
    // Root may be refused nothing; anyone else keeps at least the hard limit
    // as the soft one, since lowering is always allowed and raising up to
    // the hard limit too.
    assert_eq!(limit.current, limit.maximum);
}

#[test]
fn sigterm_cancels_the_shutdown_token() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let shutdown = kanava_runtime::shutdown_on_signal();
        // Let the handler install itself before the signal arrives; without
        // it the signal would end this test process.
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!shutdown.is_cancelled());
        rustix::process::kill_process(rustix::process::getpid(), rustix::process::Signal::TERM)
            .expect("signal ourselves");
        tokio::time::timeout(Duration::from_secs(5), shutdown.cancelled())
            .await
            .expect("the token is cancelled by SIGTERM");
    });
}

#[test]
fn log_formats_are_text_by_default_or_json() {
    assert_eq!(LogFormat::default(), LogFormat::Text);
    assert_eq!(LogFormat::from_str("json", false), Ok(LogFormat::Json));
    assert!(LogFormat::from_str("yaml", false).is_err());
}

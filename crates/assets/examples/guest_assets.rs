//! Fetches and builds the default guest assets, printing where they are.
//!
//! ```text
//! cargo run -p cela-assets --example guest_assets -- <cache dir> <init binary>
//! ```

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

fn main() -> ExitCode {
    let args: Vec<PathBuf> = std::env::args_os().skip(1).map(PathBuf::from).collect();
    let [cache, init] = args.as_slice() else {
        eprintln!("usage: guest_assets <cache dir> <init binary>");
        return ExitCode::from(2);
    };
    let started = Instant::now();
    match cela_assets::guest_assets(cache, init, &cela_assets::Progress::new()) {
        Ok(a) => {
            println!("kernel  {} ({})", a.kernel.display(), a.kernel_version);
            println!("initrd  {}", a.initrd.display());
            println!("took    {:.3}s", started.elapsed().as_secs_f64());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

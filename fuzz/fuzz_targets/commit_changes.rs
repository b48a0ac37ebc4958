//! Fuzzes what an API client gives `commit` (`cela_image::commit::check_request`,
//! `apply_change`): a name and Dockerfile instructions, split from arbitrary bytes. Any input
//! is refused with an error or applied, never a panic; an instruction that is accepted once is
//! accepted again on the config it made, and the config stays a JSON object. Run:
//! `cargo +nightly fuzz run commit_changes` here.

#![no_main]

use cela_image::commit::{apply_change, check_request};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let mut lines = text.split('\n');
    let name = lines.next().filter(|n| !n.is_empty());
    let changes: Vec<String> = lines.map(str::to_owned).collect();
    let _ = check_request(name, &changes);
    let mut run = serde_json::Map::new();
    for line in &changes {
        if apply_change(&mut run, line).is_ok() {
            assert!(
                apply_change(&mut run, line).is_ok(),
                "{line:?} applied once but not twice"
            );
        }
    }
    assert!(serde_json::to_vec(&run).is_ok());
});

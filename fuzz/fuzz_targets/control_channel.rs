//! Fuzzes the control channel's line parser (`cela_guest::ControlParser`), which reads what the
//! guest's init writes to the host (`ready`, `exit N`) and what the host writes to the init
//! (`signal N`): any bytes, cut into chunks anywhere, give the same messages as when fed whole,
//! never a panic, and every message it accepts reads back from its own line. Run:
//! `cargo +nightly fuzz run control_channel` here.

#![no_main]

use cela_guest::{ControlMessage, ControlParser, HostRequest};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&cut, bytes)) = data.split_first() else {
        return;
    };
    let whole: Vec<ControlMessage> = ControlParser::default().feed(bytes);
    let mut chunked = Vec::new();
    let mut parser = ControlParser::<ControlMessage>::default();
    for chunk in bytes.chunks(usize::from(cut).max(1)) {
        chunked.extend(parser.feed(chunk));
    }
    assert_eq!(whole, chunked, "chunking changed the messages");
    for m in whole {
        let again: Vec<ControlMessage> = ControlParser::default().feed(m.to_line().as_bytes());
        assert_eq!(again, [m]);
    }
    for r in ControlParser::<HostRequest>::default().feed(bytes) {
        let again: Vec<HostRequest> = ControlParser::default().feed(r.to_line().as_bytes());
        assert_eq!(again, [r]);
    }
});

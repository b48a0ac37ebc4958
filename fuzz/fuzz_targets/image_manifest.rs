//! Fuzzes what cela reads of a registry's or a layout's metadata (`cela_image::manifest`):
//! any bytes are a manifest, an index or a named error, never a panic; a manifest is then
//! checked (`check_image`: media types, declared sizes, layer count) and an index asked for
//! its linux/amd64 image (`pick_platform`), as pull and import do. Run:
//! `cargo +nightly fuzz run image_manifest` here.

#![no_main]

use cela_image::manifest::{self, Parsed};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match manifest::parse("fuzz", data) {
        Ok(Parsed::Manifest(m)) => {
            let _ = manifest::check_image("fuzz", &m);
        }
        Ok(Parsed::Index(i)) => {
            let _ = manifest::pick_platform("fuzz", &i);
        }
        Err(e) => assert!(!e.to_string().is_empty()),
    }
});

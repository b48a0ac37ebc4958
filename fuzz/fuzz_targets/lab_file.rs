//! Fuzzes lab files (`cela_instance::lab::file::LabFile::parse` and `plan`, what `cela lab up`
//! reads): any text gives a plan or an error, never a panic, a hang or unbounded memory (the
//! YAML parser's alias and depth budgets), and a plan that is made keeps within the limits
//! `lab up` relies on: valid names, at most MAX_NODES nodes and MAX_LINKS links, every link
//! between two distinct planned container nodes, every impairment consistent. Run:
//! `cargo +nightly fuzz run lab_file` here.

#![no_main]

use cela_instance::lab::file::{LabFile, MAX_LINKS, MAX_NODES, valid_name};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(file) = LabFile::parse(text) else {
        return;
    };
    let Ok(plan) = file.plan(None) else {
        return;
    };
    assert!(valid_name(&plan.name));
    assert!(!plan.nodes.is_empty() && plan.nodes.len() <= MAX_NODES);
    assert!(plan.links.len() <= MAX_LINKS);
    for n in &plan.nodes {
        assert!(valid_name(&n.name));
    }
    for l in &plan.links {
        assert_ne!(l.ends[0].node, l.ends[1].node);
        for e in &l.ends {
            assert!(plan.nodes.iter().any(|n| n.name == e.node));
            assert!(!e.iface.is_empty() && e.iface.len() < 16);
        }
        assert!(l.impair.check().is_ok());
    }
});

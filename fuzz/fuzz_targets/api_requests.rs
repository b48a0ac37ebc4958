//! Fuzzes what an API client's create request becomes before anything is made: the Docker
//! API's `POST /containers/create` body (`cela_api::docker::parse_create`, with the asks cela
//! refuses and the `HostConfig` conversions: memory rounded to MiB, NanoCpus to whole CPUs,
//! binds parsed) and cela's own `POST /cela/v1/instances` body (`cela_api::own::parse_create`,
//! strict JSON). Any body gives a request or an error answer with a 4xx/5xx status and a
//! message, never a panic or an overflow. The query values the event and list endpoints take
//! go through the same: a time (`since`/`until`, `cela_instance::events::parse_time`) and
//! Docker's `filters` JSON (`cela_api::docker::parse_filters`), and the strings a create
//! request carries for networks and ports, parsed directly (`--net NAME[,ip=][,mac=]`, `-p
//! [IP:]HOST_PORT:PORT[/PROTO]`, a `--subnet`): each is refused or round-trips. Run: `cargo +nightly fuzz run
//! api_requests` here.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The first byte picks the API (and, for Docker's, whether a name came in the query).
    let Some((&pick, body)) = data.split_first() else {
        return;
    };
    let result = match pick % 6 {
        0 => cela_api::docker::parse_create(body, None),
        1 => cela_api::docker::parse_create(body, Some("fuzzed".into())),
        2 => cela_api::own::parse_create(body).map(|(req, _)| req),
        3 => {
            if let Ok(v) = std::str::from_utf8(body)
                && let Ok(t) = cela_instance::events::parse_time(v)
                && v.bytes().all(|b| b.is_ascii_digit() || b == b'.')
            {
                // Seconds since the epoch are never before it.
                assert!(t >= 0, "{v:?} gave {t}");
            }
            return;
        }
        5 => {
            use cela_instance::network::{named, ports};
            let Ok(v) = std::str::from_utf8(body) else {
                return;
            };
            if let Ok(a) = named::Attachment::parse(v) {
                assert!(!a.network.is_empty() && a.network.len() <= 64, "{v:?}");
            }
            if let Ok(p) = ports::PortMapping::parse(v) {
                let again = ports::PortMapping::parse(&p.display().replace("->", ":"))
                    .expect("a parsed mapping's own form parses");
                assert_eq!(again, p, "{v:?}");
                assert!(p.host_port != 0 && p.port != 0, "{v:?}");
            }
            if let Ok(n) = named::parse_subnet(v) {
                assert!((8..=30).contains(&n.prefix), "{v:?}");
            }
            return;
        }
        _ => {
            if let Ok(v) = std::str::from_utf8(body)
                && let Err(e) = cela_api::docker::parse_filters(Some(v))
            {
                assert_eq!(e.status.as_u16(), 400, "{e:?}");
            }
            return;
        }
    };
    match result {
        Ok(req) => {
            // What later code relies on: numbers within reason, volumes absolute.
            if let Some(cpus) = req.cpus {
                assert!(cpus >= 1, "{req:?}");
            }
            for v in &req.volumes {
                assert!(v.dest.starts_with('/'), "{req:?}");
            }
        }
        Err(e) => {
            assert!((400..600).contains(&e.status.as_u16()), "{e:?}");
            assert!(!e.message.is_empty());
        }
    }
});

//! Fuzzes what an API client's create request becomes before anything is made: the Docker
//! API's `POST /containers/create` body (`cela_api::docker::parse_create`, with the asks cela
//! refuses and the `HostConfig` conversions: memory rounded to MiB, NanoCpus to whole CPUs,
//! binds parsed) and cela's own `POST /cela/v1/instances` body (`cela_api::own::parse_create`,
//! strict JSON). Any body gives a request or an error answer with a 4xx/5xx status and a
//! message, never a panic or an overflow. Run: `cargo +nightly fuzz run api_requests` here.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The first byte picks the API (and, for Docker's, whether a name came in the query).
    let Some((&pick, body)) = data.split_first() else {
        return;
    };
    let result = match pick % 3 {
        0 => cela_api::docker::parse_create(body, None),
        1 => cela_api::docker::parse_create(body, Some("fuzzed".into())),
        _ => cela_api::own::parse_create(body).map(|(req, _)| req),
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

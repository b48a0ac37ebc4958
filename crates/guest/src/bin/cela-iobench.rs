//! `cela-iobench`: the guest side of cela's block benchmark (scripts/bench/lab-blk). A small
//! static program (no fio in a busybox guest) that measures a block device with O_DIRECT, so
//! the guest's page cache is out of the way and every request reaches the virtual device:
//!
//! - sequential write and read in 1 MiB requests (MiB/s);
//! - 4 KiB random reads at queue depth 1 and 4 (threads), for a fixed time (IOPS).
//!
//! usage: cela-iobench DEVICE [MiB] [SECONDS]   (defaults: 128 MiB, 3 s per random test)
//!
//! Prints one `RESULT <test> <value>` line per test. Not a test of cela itself: a tool the
//! benchmark runs, under cela and under QEMU alike.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;
/// O_DIRECT needs buffers aligned to the logical block size; a page is enough for any.
const ALIGN: usize = 4096;

/// A buffer of `len` bytes at an `ALIGN`-aligned address, carved out of a larger Vec.
struct Aligned {
    storage: Vec<u8>,
    offset: usize,
    len: usize,
}

impl Aligned {
    fn new(len: usize, fill: u8) -> Self {
        let storage = vec![fill; len + ALIGN];
        let offset = storage.as_ptr().align_offset(ALIGN);
        Aligned {
            storage,
            offset,
            len,
        }
    }

    fn get(&mut self) -> &mut [u8] {
        &mut self.storage[self.offset..self.offset + self.len]
    }
}

fn open(device: &str, write: bool) -> std::io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(write)
        .custom_flags(libc::O_DIRECT)
        .open(device)
}

fn sequential(device: &str, mib: u64, write: bool) -> std::io::Result<f64> {
    let file = open(device, write)?;
    let mut buf = Aligned::new(MIB as usize, 0x5a);
    let start = Instant::now();
    for i in 0..mib {
        if write {
            file.write_all_at(buf.get(), i * MIB)?;
        } else {
            file.read_exact_at(buf.get(), i * MIB)?;
        }
    }
    if write {
        file.sync_all()?;
    }
    Ok(mib as f64 / start.elapsed().as_secs_f64())
}

/// 4 KiB reads at random 4 KiB-aligned offsets within the first `mib` MiB, from `depth`
/// threads, for `secs` seconds; returns reads per second.
fn random_reads(device: &str, mib: u64, depth: usize, secs: u64) -> std::io::Result<f64> {
    let blocks = mib * MIB / 4096;
    let done = AtomicU64::new(0);
    let stop = Instant::now() + Duration::from_secs(secs);
    let start = Instant::now();
    std::thread::scope(|s| -> std::io::Result<()> {
        let workers: Vec<_> = (0..depth)
            .map(|t| {
                let done = &done;
                s.spawn(move || -> std::io::Result<()> {
                    let file = open(device, false)?;
                    let mut buf = Aligned::new(4096, 0);
                    // xorshift64: a different, repeatable sequence per thread.
                    let mut x: u64 = 0x9e37_79b9_7f4a_7c15 ^ (t as u64 + 1);
                    while Instant::now() < stop {
                        for _ in 0..64 {
                            x ^= x << 13;
                            x ^= x >> 7;
                            x ^= x << 17;
                            file.read_exact_at(buf.get(), (x % blocks) * 4096)?;
                        }
                        done.fetch_add(64, Ordering::Relaxed);
                    }
                    Ok(())
                })
            })
            .collect();
        for w in workers {
            w.join().expect("a benchmark thread panicked")?;
        }
        Ok(())
    })?;
    Ok(done.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let Some(device) = args.get(1) else {
        eprintln!("usage: cela-iobench DEVICE [MiB] [SECONDS]");
        return ExitCode::from(2);
    };
    let mib: u64 = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(128);
    let secs: u64 = args.get(3).and_then(|a| a.parse().ok()).unwrap_or(3);
    let run = || -> std::io::Result<()> {
        println!(
            "RESULT seq_write_mibs {:.1}",
            sequential(device, mib, true)?
        );
        println!(
            "RESULT seq_read_mibs {:.1}",
            sequential(device, mib, false)?
        );
        println!(
            "RESULT rand_read_qd1_iops {:.0}",
            random_reads(device, mib, 1, secs)?
        );
        println!(
            "RESULT rand_read_qd4_iops {:.0}",
            random_reads(device, mib, 4, secs)?
        );
        Ok(())
    };
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cela-iobench: {device}: {e}");
            ExitCode::FAILURE
        }
    }
}

//! Both ends of the conversation between the host and the L1 guest: the `/init` script the
//! host writes into the L1 initramfs, and the parser for what that script prints on the console.
//!
//! The only channel out of L1 is its serial console, shared with the kernel and with anything a
//! scenario writes to `/dev/console`. So results travel as *marker lines*, each starting at the
//! beginning of a line with `@@LAB `, and everything else on the console is ignored:
//!
//! ```text
//! @@LAB init <uptime>                  /init started (L1 kernel boot time)
//! @@LAB ready <uptime>                 modules loaded, /dev/kvm present; scenarios start
//! @@LAB fatal <message>                /init cannot go on (then it powers off)
//! @@LAB <i> begin                      scenario i starts
//! @@LAB <i> stdout <base64>            zero or more lines: scenario i's stdout, base64 in
//! @@LAB <i> stderr <base64>              76-column lines (busybox `base64` default wrapping)
//! @@LAB <i> end <rc> <t0> <t1> <out-len> <err-len>
//! @@LAB done                           all scenarios ran; /init powers off
//! ```
//!
//! Scenarios are named by their index, so a name can be any string. `t0`/`t1` are L1 uptimes
//! (`/proc/uptime`, centiseconds) around the script, and the byte lengths let the host detect a
//! result line that something else on the console corrupted. After `@@LAB init`, `/init` lowers
//! the console log level to emergencies only, so kernel messages do not land inside result lines.
//!
//! Each scenario runs as `setsid timeout <secs> sh /.lab/<i>.sh` in `/lab`, stdin from
//! `/dev/null`, stdout and stderr to files. `setsid` gives it a process group of its own, which
//! `/init` kills after the script ends so that nothing it left behind (a VMM still running, the
//! `timeout` watcher) leaks into the next scenario. Busybox `timeout` signals with SIGTERM and,
//! unlike coreutils, does not exit 124: a scenario that timed out ends with rc 143.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;

/// The prefix of every result line.
const MARK: &str = "@@LAB";

/// The line `/init` prints when L1 has booted, loaded its modules and found /dev/kvm.
pub(crate) const READY_MARK: &[u8] = b"\n@@LAB ready ";
/// Seconds between L1's heartbeat lines (`@@LAB tick`), from `ready` to the power-off.
pub(crate) const TICK_SECS: u64 = 15;
/// How long the console may stay silent after `ready` before the host calls L1 frozen: eight
/// missed heartbeats. (QEMU-TCG L1s have been seen to stop making progress altogether, now and
/// then; see docs/TESTING.md.)
pub(crate) const SILENCE_BOUND: std::time::Duration = std::time::Duration::from_secs(8 * TICK_SECS);

/// The directory (relative to the initramfs root) holding the scenario scripts and outputs.
pub(crate) const WORK_DIR: &str = ".lab";

/// The archive path of scenario `index`'s script.
pub(crate) fn script_path(index: usize) -> String {
    format!("{WORK_DIR}/{index}.sh")
}

/// What `/init` needs to know about one scenario.
pub(crate) struct ScenarioPlan {
    /// The timeout enforced inside L1, in whole seconds (busybox `timeout` counts seconds).
    pub timeout_secs: u64,
}

/// Quotes `s` for a POSIX shell.
fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The L1 `/init` script. `modules` are absolute L1 paths of kernel modules, dependencies first.
pub(crate) fn init_script(modules: &[String], scenarios: &[ScenarioPlan]) -> String {
    let mut s = String::new();
    s.push_str(&format!(
        r#"#!/bin/sh
# /init of the cela lab's L1 guest, written by cela-lab for one run (crates/lab/src/protocol.rs).
export PATH=/lab:/bin:/sbin:/usr/bin:/usr/sbin HOME=/tmp
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
# The links udev makes on a real host (nft -f - reads /dev/stdin).
ln -s /proc/self/fd /dev/fd
ln -s /proc/self/fd/0 /dev/stdin
ln -s /proc/self/fd/1 /dev/stdout
ln -s /proc/self/fd/2 /dev/stderr
mount -t tmpfs tmpfs /tmp
# cgroup2, as a systemd host has it: cela's jailed monitors get their cgroups there.
mount -t cgroup2 cgroup2 /sys/fs/cgroup
read up _ </proc/uptime
echo "{MARK} init $up"
# From here on only emergencies reach the console: no kernel message inside a result line.
dmesg -n 1
lab_fatal() {{
  dmesg | tail -n 20
  echo "{MARK} fatal $*"
  poweroff -f
  exit 1
}}
"#
    ));
    for module in modules {
        let q = sh_quote(module);
        s.push_str(&format!(
            "insmod {q} || lab_fatal \"insmod {module} failed (kernel log above)\"\n"
        ));
    }
    s.push_str(&format!(
        r#"[ -c /dev/kvm ] || lab_fatal "no /dev/kvm in L1 after loading kvm-amd: QEMU's CPU model must offer AMD SVM (-cpu max does under TCG)"
read up _ </proc/uptime
echo "{MARK} ready $up"
# A heartbeat, so that the host tells a frozen L1 from a slow scenario in a minute or two
# (usleep, not sleep: scenarios count their own leftover `sleep`s).
( while :; do usleep {TICK_SECS}000000; echo "{MARK} tick"; done ) &
lab_run() {{
  echo "{MARK} $1 begin"
  read t0 _ </proc/uptime
  cd /lab
  setsid timeout "$2" sh /{WORK_DIR}/$1.sh </dev/null >/{WORK_DIR}/$1.out 2>/{WORK_DIR}/$1.err &
  pid=$!
  wait $pid
  rc=$?
  read t1 _ </proc/uptime
  cd /
  kill -KILL -$pid 2>/dev/null
  base64 /{WORK_DIR}/$1.out | sed "s/^/{MARK} $1 stdout /"
  base64 /{WORK_DIR}/$1.err | sed "s/^/{MARK} $1 stderr /"
  echo "{MARK} $1 end $rc $t0 $t1 $(wc -c </{WORK_DIR}/$1.out) $(wc -c </{WORK_DIR}/$1.err)"
}}
"#
    ));
    for (index, plan) in scenarios.iter().enumerate() {
        s.push_str(&format!("lab_run {index} {}\n", plan.timeout_secs));
    }
    s.push_str(&format!("echo \"{MARK} done\"\npoweroff -f\n"));
    s
}

/// One scenario's result as the console reported it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct RawResult {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub rc: i32,
    pub t0: f64,
    pub t1: f64,
}

/// Everything the console said, as far as it got.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct Transcript {
    /// L1 uptime when `/init` started.
    pub init: Option<f64>,
    /// L1 uptime when the modules were loaded and scenarios started.
    pub ready: Option<f64>,
    pub fatal: Option<String>,
    /// Results by scenario index; `None` for a scenario that did not end.
    pub results: Vec<Option<RawResult>>,
    /// The scenario that began and has not ended.
    pub running: Option<usize>,
    pub done: bool,
}

/// Base64 text collected for one scenario until its `end` line.
#[derive(Default)]
struct Pending {
    stdout: String,
    stderr: String,
}

/// Reads the marker lines of `console` for a run of `count` scenarios. Errors describe the first
/// malformed or inconsistent marker line.
pub(crate) fn parse(console: &str, count: usize) -> Result<Transcript, String> {
    let mut t = Transcript {
        results: vec![None; count],
        ..Transcript::default()
    };
    let mut pending: Vec<Pending> = (0..count).map(|_| Pending::default()).collect();
    for (lineno, raw) in console.lines().enumerate() {
        let line = raw.trim_end_matches('\r');
        let Some(rest) = line.strip_prefix(MARK).and_then(|r| r.strip_prefix(' ')) else {
            continue;
        };
        let bad = |why: &str| format!("console line {}: {why}: {line:?}", lineno + 1);
        let mut words = rest.splitn(3, ' ');
        let first = words.next().unwrap_or("");
        match first {
            "init" => t.init = Some(number(words.next(), &bad)?),
            "ready" => t.ready = Some(number(words.next(), &bad)?),
            "fatal" => t.fatal = Some(rest["fatal".len()..].trim().to_owned()),
            "done" => t.done = true,
            "tick" => {}
            _ => {
                let index: usize = first.parse().map_err(|_| bad("unknown marker"))?;
                if index >= count {
                    return Err(bad("scenario index out of range"));
                }
                let kind = words.next().unwrap_or("");
                let payload = words.next().unwrap_or("");
                match kind {
                    "begin" => t.running = Some(index),
                    "stdout" => pending[index].stdout.push_str(payload.trim()),
                    "stderr" => pending[index].stderr.push_str(payload.trim()),
                    "end" => {
                        let p = std::mem::take(&mut pending[index]);
                        t.results[index] = Some(end_line(payload, p, &bad)?);
                        if t.running == Some(index) {
                            t.running = None;
                        }
                    }
                    _ => return Err(bad("unknown scenario marker")),
                }
            }
        }
    }
    Ok(t)
}

/// Parses the fields of an `end` line and decodes the collected output.
fn end_line(
    fields: &str,
    pending: Pending,
    bad: &dyn Fn(&str) -> String,
) -> Result<RawResult, String> {
    let f: Vec<&str> = fields.split_whitespace().collect();
    let [rc, t0, t1, out_len, err_len] = f[..] else {
        return Err(bad("an end line has five fields"));
    };
    let rc: i32 = rc.parse().map_err(|_| bad("exit status is not a number"))?;
    let t0 = number(Some(t0), bad)?;
    let t1 = number(Some(t1), bad)?;
    let decode = |text: &str, len: &str, stream: &str| -> Result<Vec<u8>, String> {
        let bytes = STANDARD
            .decode(text)
            .map_err(|e| bad(&format!("{stream} is not valid base64 ({e})")))?;
        let len: usize = len
            .parse()
            .map_err(|_| bad(&format!("{stream} length is not a number")))?;
        if bytes.len() != len {
            return Err(bad(&format!(
                "{stream} decodes to {} bytes but L1 wrote {len}; a result line was corrupted",
                bytes.len()
            )));
        }
        Ok(bytes)
    };
    Ok(RawResult {
        stdout: decode(&pending.stdout, out_len, "stdout")?,
        stderr: decode(&pending.stderr, err_len, "stderr")?,
        rc,
        t0,
        t1,
    })
}

fn number(word: Option<&str>, bad: &dyn Fn(&str) -> String) -> Result<f64, String> {
    word.and_then(|w| w.trim().parse().ok())
        .ok_or_else(|| bad("expected a number"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b64_lines(index: usize, stream: &str, data: &[u8]) -> String {
        let text = STANDARD.encode(data);
        let mut out = String::new();
        for chunk in text.as_bytes().chunks(76) {
            out.push_str(&format!(
                "@@LAB {index} {stream} {}\r\n",
                std::str::from_utf8(chunk).unwrap()
            ));
        }
        out
    }

    #[test]
    fn parses_a_whole_run_among_kernel_noise() {
        let binary: Vec<u8> = (0..=255u8).cycle().take(1000).collect();
        let mut console = String::from("[    0.36] PCI: Fatal: No config space access\r\n");
        console.push_str("@@LAB init 1.32\r\n@@LAB ready 1.91\r\n@@LAB 0 begin\r\n");
        console.push_str(&b64_lines(0, "stdout", &binary));
        console.push_str("Terminated\r\n");
        console.push_str(&b64_lines(0, "stderr", b"oops\n"));
        console.push_str("@@LAB 0 end 0 2.00 2.50 1000 5\r\n");
        console.push_str("@@LAB 1 begin\r\n@@LAB 1 end 3 2.60 2.61 0 0\r\n@@LAB done\r\n");
        console.push_str("[    3.1] reboot: Power down\r\n");
        let t = parse(&console, 2).unwrap();
        assert_eq!(t.init, Some(1.32));
        assert_eq!(t.ready, Some(1.91));
        assert!(t.done);
        assert_eq!(t.running, None);
        let r0 = t.results[0].as_ref().unwrap();
        assert_eq!(r0.stdout, binary);
        assert_eq!(r0.stderr, b"oops\n");
        assert_eq!((r0.rc, r0.t0, r0.t1), (0, 2.0, 2.5));
        let r1 = t.results[1].as_ref().unwrap();
        assert_eq!((r1.rc, r1.stdout.len(), r1.stderr.len()), (3, 0, 0));
    }

    #[test]
    fn a_run_cut_short_names_the_running_scenario() {
        let t = parse(
            "@@LAB init 1\n@@LAB ready 2\n@@LAB 0 begin\n@@LAB 0 stdout aGk=\n",
            2,
        )
        .unwrap();
        assert_eq!(t.running, Some(0));
        assert!(!t.done);
        assert_eq!(t.results, vec![None, None]);
    }

    #[test]
    fn fatal_keeps_the_message() {
        let t = parse("@@LAB init 1\n@@LAB fatal no /dev/kvm in L1\n", 0).unwrap();
        assert_eq!(t.fatal.as_deref(), Some("no /dev/kvm in L1"));
    }

    #[test]
    fn a_corrupted_line_is_an_error_not_wrong_bytes() {
        // A kernel message landed inside the base64 text.
        let console = "@@LAB 0 begin\n@@LAB 0 stdout aGVsbG8[ 1.0] x\n@@LAB 0 end 0 1 2 5 0\n";
        let err = parse(console, 1).unwrap_err();
        assert!(err.contains("not valid base64"), "{err}");
        // Text that happens to decode, but to the wrong length.
        let console = "@@LAB 0 begin\n@@LAB 0 stdout aGk=\n@@LAB 0 end 0 1 2 5 0\n";
        let err = parse(console, 1).unwrap_err();
        assert!(err.contains("decodes to 2 bytes but L1 wrote 5"), "{err}");
    }

    #[test]
    fn malformed_markers_are_errors() {
        assert!(parse("@@LAB 7 begin\n", 2).is_err());
        assert!(parse("@@LAB 0 end 0 1\n", 1).is_err());
        assert!(parse("@@LAB bogus\n", 1).is_err());
        // Not a marker: the prefix must start the line and be followed by a space.
        assert!(parse("x @@LAB bogus\n@@LABbogus\n", 1).is_ok());
    }

    #[test]
    fn init_script_loads_modules_in_order_and_runs_each_scenario() {
        let modules = [
            "/lib/modules/lab/kvm.ko".to_owned(),
            "/lib/modules/lab/kvm-amd.ko".to_owned(),
        ];
        let plans = [
            ScenarioPlan { timeout_secs: 30 },
            ScenarioPlan { timeout_secs: 5 },
        ];
        let s = init_script(&modules, &plans);
        assert!(s.starts_with("#!/bin/sh\n"));
        let kvm = s.find("insmod '/lib/modules/lab/kvm.ko'").unwrap();
        let amd = s.find("insmod '/lib/modules/lab/kvm-amd.ko'").unwrap();
        assert!(kvm < amd);
        assert!(s.contains("\nlab_run 0 30\nlab_run 1 5\necho \"@@LAB done\"\npoweroff -f\n"));
    }

    #[test]
    fn sh_quote_survives_single_quotes() {
        assert_eq!(sh_quote("a'b"), r"'a'\''b'");
    }
}

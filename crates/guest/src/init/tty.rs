//! The guest's serial ports as terminals: the console (COM1, `/dev/ttyS0`) and the control
//! channel (COM2, `/dev/ttyS1`).
//!
//! A port carrying a workload's output or control messages is put in raw mode, so the bytes a
//! program writes reach the host unchanged (no `\n` → `\r\n`, no echo, no signals). The console
//! of an interactive shell is left in cooked mode with `stty sane`-like settings instead.

use std::fs::File;

use nix::fcntl::{FcntlArg, OFlag, fcntl, open};
use nix::sys::stat::Mode;
use nix::sys::termios::{
    ControlFlags, InputFlags, LocalFlags, OutputFlags, SetArg, SpecialCharacterIndices, Termios,
    cfmakeraw, tcgetattr, tcsetattr,
};

/// How a serial port is configured when it is opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TtyMode {
    /// Bytes pass untouched both ways.
    Raw,
    /// A line-editing terminal for a person at a shell.
    Sane,
}

/// Opens a serial port without making it init's controlling terminal, and configures it.
///
/// The port is opened non-blocking and given `CLOCAL` before anything else, so an open never
/// waits for a modem carrier the emulated UART might not raise; then it is made blocking again.
pub fn open_tty(path: &str, access: OFlag, mode: TtyMode) -> nix::Result<File> {
    let flags = access | OFlag::O_NOCTTY | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC;
    let fd = open(path, flags, Mode::empty())?;
    let mut termios = tcgetattr(&fd)?;
    termios.control_flags |= ControlFlags::CLOCAL;
    match mode {
        TtyMode::Raw => cfmakeraw(&mut termios),
        TtyMode::Sane => make_sane(&mut termios),
    }
    tcsetattr(&fd, SetArg::TCSANOW, &termios)?;
    let status = OFlag::from_bits_retain(fcntl(&fd, FcntlArg::F_GETFL)?);
    fcntl(&fd, FcntlArg::F_SETFL(status - OFlag::O_NONBLOCK))?;
    Ok(File::from(fd))
}

/// Sets the size of the terminal `fd` is (a pseudo-terminal's master or a serial port): the
/// kernel sends SIGWINCH to its foreground process group when it changes.
pub fn set_window_size(fd: impl std::os::fd::AsFd, rows: u16, cols: u16) {
    use std::os::fd::AsRawFd as _;
    let size = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one winsize from the pointer, which lives for the call.
    unsafe { libc::ioctl(fd.as_fd().as_raw_fd(), libc::TIOCSWINSZ, &size) };
}

/// Sizes the console's terminal (a host's `resize` request). Opened anew, without becoming
/// init's controlling terminal: init holds no descriptor of it while a workload runs on it.
pub fn resize_console(rows: u16, cols: u16) {
    if let Ok(f) = open_tty_plain(cela_guest::CONSOLE_TTY) {
        set_window_size(&f, rows, cols);
    }
}

fn open_tty_plain(path: &str) -> nix::Result<std::os::fd::OwnedFd> {
    open(
        path,
        OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
}

/// Cooked-mode settings for an interactive console, as `stty sane` gives: line editing, echo,
/// signal keys, CR→NL on input and NL→CR NL on output, 8-bit characters.
pub fn make_sane(t: &mut Termios) {
    t.input_flags.remove(
        InputFlags::IGNBRK
            | InputFlags::INLCR
            | InputFlags::IGNCR
            | InputFlags::IXOFF
            | InputFlags::ISTRIP
            | InputFlags::PARMRK,
    );
    t.input_flags.insert(
        InputFlags::BRKINT
            | InputFlags::ICRNL
            | InputFlags::IXON
            | InputFlags::IMAXBEL
            | InputFlags::IUTF8,
    );
    t.output_flags
        .remove(OutputFlags::OCRNL | OutputFlags::ONOCR | OutputFlags::ONLRET);
    t.output_flags
        .insert(OutputFlags::OPOST | OutputFlags::ONLCR);
    t.control_flags
        .remove(ControlFlags::CSIZE | ControlFlags::PARENB);
    t.control_flags
        .insert(ControlFlags::CS8 | ControlFlags::CREAD);
    t.local_flags
        .remove(LocalFlags::ECHONL | LocalFlags::NOFLSH | LocalFlags::TOSTOP | LocalFlags::EXTPROC);
    t.local_flags.insert(
        LocalFlags::ISIG
            | LocalFlags::ICANON
            | LocalFlags::IEXTEN
            | LocalFlags::ECHO
            | LocalFlags::ECHOE
            | LocalFlags::ECHOK
            | LocalFlags::ECHOCTL
            | LocalFlags::ECHOKE,
    );
    use SpecialCharacterIndices as C;
    for (index, key) in [
        (C::VINTR, 0x03),    // ^C
        (C::VQUIT, 0x1c),    // ^\
        (C::VERASE, 0x7f),   // DEL
        (C::VKILL, 0x15),    // ^U
        (C::VEOF, 0x04),     // ^D
        (C::VSTART, 0x11),   // ^Q
        (C::VSTOP, 0x13),    // ^S
        (C::VSUSP, 0x1a),    // ^Z
        (C::VREPRINT, 0x12), // ^R
        (C::VWERASE, 0x17),  // ^W
        (C::VLNEXT, 0x16),   // ^V
    ] {
        t.control_chars[index as usize] = key;
    }
    t.control_chars[C::VMIN as usize] = 1;
    t.control_chars[C::VTIME as usize] = 0;
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::pty::openpty;

    #[test]
    fn raw_then_sane_settings_reach_a_real_terminal() {
        let pty = openpty(None, None).unwrap();
        let path = nix::unistd::ttyname(&pty.slave).unwrap();
        let path = path.to_str().unwrap();

        let raw = open_tty(path, OFlag::O_RDWR, TtyMode::Raw).unwrap();
        let t = tcgetattr(&raw).unwrap();
        assert!(!t.output_flags.contains(OutputFlags::OPOST));
        assert!(
            !t.local_flags
                .intersects(LocalFlags::ECHO | LocalFlags::ICANON | LocalFlags::ISIG)
        );
        assert!(t.control_flags.contains(ControlFlags::CLOCAL));
        let status = OFlag::from_bits_retain(fcntl(&raw, FcntlArg::F_GETFL).unwrap());
        assert!(!status.contains(OFlag::O_NONBLOCK));

        let sane = open_tty(path, OFlag::O_RDWR, TtyMode::Sane).unwrap();
        let t = tcgetattr(&sane).unwrap();
        assert!(
            t.output_flags
                .contains(OutputFlags::OPOST | OutputFlags::ONLCR)
        );
        assert!(
            t.local_flags
                .contains(LocalFlags::ECHO | LocalFlags::ICANON | LocalFlags::ISIG)
        );
        assert!(t.input_flags.contains(InputFlags::ICRNL));
        assert_eq!(
            t.control_chars[SpecialCharacterIndices::VINTR as usize],
            0x03
        );
    }
}

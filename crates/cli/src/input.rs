//! Reading texts from stdin one line at a time, without losing any: a line that is not valid UTF-8 is
//! reported on its own and the next line is read as usual.

use anyhow::Result;
use std::io::BufRead;

pub enum Line {
    Text(usize, String),
    Invalid(usize, String),
}

/// Longest line accepted (bytes); longer ones are reported, not truncated.
pub const MAX_LINE: usize = 1 << 20;

/// Calls `f` for every line (1-based numbers). `f` returns false when that line failed. Returns the
/// number of failed lines.
pub fn for_each_line(f: &mut dyn FnMut(Line) -> bool) -> Result<usize> {
    let stdin = std::io::stdin();
    let mut reader = stdin.lock();
    let mut buf = Vec::new();
    let mut n = 0;
    let mut failed = 0;
    loop {
        buf.clear();
        if reader.read_until(b'\n', &mut buf)? == 0 {
            break;
        }
        n += 1;
        if buf.last() == Some(&b'\n') {
            buf.pop();
        }
        if buf.last() == Some(&b'\r') {
            buf.pop();
        }
        let line = if buf.len() > MAX_LINE {
            Line::Invalid(n, format!("line is longer than {MAX_LINE} bytes"))
        } else if buf.contains(&0) {
            Line::Invalid(n, "line contains a NUL byte".into())
        } else {
            match String::from_utf8(buf.clone()) {
                Ok(s) => Line::Text(n, s),
                Err(e) => Line::Invalid(
                    n,
                    format!("invalid UTF-8 at byte {}", e.utf8_error().valid_up_to()),
                ),
            }
        };
        if !f(line) {
            failed += 1;
        }
    }
    Ok(failed)
}

//! Bounds on what one manifest file may cost to parse, checked before the YAML parser sees
//! its bytes. libyaml's scanner (under serde_yaml) slows down with the depth of flow
//! collections on one line: a megabyte of `[` took it half a minute, two megabytes a minute
//! and a half. serde_yaml refuses more than 128 levels anyway, after scanning everything;
//! refusing them first costs one pass over the bytes.

use std::path::Path;

/// Larger manifest files are not read (a Kubernetes object is at most ~1.5 MB; a file of
/// 100,000 Services is about 30 MB).
pub const MAX_FILE_BYTES: u64 = 64 << 20;

/// Deeper flow collections (`[`, `{`) are refused: serde_yaml's own recursion limit.
pub const MAX_FLOW_DEPTH: usize = 128;

/// Reads `file`, whose size is `len`, unless it is over [`MAX_FILE_BYTES`].
pub fn read_file(file: &Path, len: u64) -> Result<Vec<u8>, String> {
    if len > MAX_FILE_BYTES {
        return Err(too_big(len));
    }
    let bytes = std::fs::read(file).map_err(|e| e.to_string())?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(too_big(bytes.len() as u64));
    }
    Ok(bytes)
}

fn too_big(len: u64) -> String {
    format!(
        "{:.1} MiB: over the {} MiB a manifest file may be; not read (split it)",
        len as f64 / f64::from(1 << 20),
        MAX_FILE_BYTES >> 20
    )
}

/// Checks `bytes` against the limits, before they are parsed.
pub fn check(bytes: &[u8]) -> Result<(), String> {
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(too_big(bytes.len() as u64));
    }
    match flow_depth_over(bytes, MAX_FLOW_DEPTH) {
        Some(line) => Err(format!(
            "flow collections ('[' or '{{') nested more than {MAX_FLOW_DEPTH} deep at line \
             {line}; not parsed (the YAML parser refuses that depth, after a scan that can take \
             minutes)"
        )),
        None => Ok(()),
    }
}

/// The line where flow collections first nest deeper than `limit`, if they do. Brackets in
/// comments and quoted scalars do not count; a quote opens a scalar only where one can start
/// (after a line's indentation, `[`, `{`, `,`, `:`, `-` or `?`), so the apostrophe of
/// `don't` hides nothing. Brackets inside plain scalars count (`a[0]`): an over-estimate
/// only unbalanced ones 128 deep would notice.
pub fn flow_depth_over(bytes: &[u8], limit: usize) -> Option<usize> {
    #[derive(PartialEq)]
    enum In {
        Text,
        Single,
        Double,
        Comment,
    }
    let mut state = In::Text;
    let mut depth = 0usize;
    let mut line = 1;
    // The last non-blank byte of the text on this line (None at a line's start).
    let mut previous: Option<u8> = None;
    let mut escaped = false;
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'\n' {
            line += 1;
            previous = None;
            if state == In::Comment {
                state = In::Text;
            }
            i += 1;
            continue;
        }
        match state {
            In::Comment => {}
            In::Single => {
                if b == b'\'' {
                    if bytes.get(i + 1) == Some(&b'\'') {
                        i += 1; // '' is a quote inside the scalar
                    } else {
                        state = In::Text;
                        previous = Some(b);
                    }
                }
            }
            In::Double => {
                if escaped {
                    escaped = false;
                } else if b == b'\\' {
                    escaped = true;
                } else if b == b'"' {
                    state = In::Text;
                    previous = Some(b);
                }
            }
            In::Text => match b {
                b' ' | b'\t' | b'\r' => {}
                b'#' if i == 0 || matches!(bytes[i - 1], b' ' | b'\t' | b'\n') => {
                    state = In::Comment
                }
                b'\'' | b'"'
                    if matches!(
                        previous,
                        None | Some(b'[' | b'{' | b',' | b':' | b'-' | b'?')
                    ) =>
                {
                    state = if b == b'"' { In::Double } else { In::Single };
                }
                b'[' | b'{' => {
                    depth += 1;
                    if depth > limit {
                        return Some(line);
                    }
                    previous = Some(b);
                }
                b']' | b'}' => {
                    depth = depth.saturating_sub(1);
                    previous = Some(b);
                }
                _ => previous = Some(b),
            },
        }
        i += 1;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deep_flow_nesting_is_found_and_quotes_and_comments_hide_brackets() {
        assert_eq!(flow_depth_over(&[b'['; 200], 128), Some(1));
        assert_eq!(flow_depth_over("{a: ".repeat(129).as_bytes(), 128), Some(1));
        let deep_later = format!("a: b\nc: {}", "[".repeat(129));
        assert_eq!(flow_depth_over(deep_later.as_bytes(), 128), Some(2));
        // 128 deep is what the parser accepts, and balanced brackets never add up.
        let ok = format!("{}{}", "[".repeat(128), "]".repeat(128));
        assert_eq!(flow_depth_over(ok.repeat(1000).as_bytes(), 128), None);
        for hidden in [
            format!("a: '{}'", "[".repeat(200)),
            format!("a: \"{}\\\"\"", "[".repeat(200)),
            format!("a: 'it''s {}'", "[".repeat(200)),
            format!("a: b # {}\nc: d", "[".repeat(200)),
            format!("- \"{}\"", "{".repeat(200)),
        ] {
            assert_eq!(flow_depth_over(hidden.as_bytes(), 128), None, "{hidden}");
        }
        // An apostrophe inside a plain scalar opens nothing.
        let apostrophe = format!("a: don't\nb: {}", "[".repeat(200));
        assert_eq!(flow_depth_over(apostrophe.as_bytes(), 128), Some(2));
    }

    #[test]
    fn checks_name_the_limit() {
        let deep = check(&[b'['; 1 << 20]).unwrap_err();
        assert!(deep.contains("more than 128 deep at line 1"), "{deep}");
        assert!(check(b"apiVersion: v1\nkind: Service\n").is_ok());
    }
}

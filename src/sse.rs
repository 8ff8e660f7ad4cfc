//! Server-sent events, read as the specification has clients read them:
//! lines end at CRLF, LF or CR; a line starting with `:` is a comment;
//! `field: value` loses one space after the colon; an event's `data`
//! values are joined with newlines; an event is dispatched at a blank line,
//! never at the body's end. The gateway's list filter and the answer
//! scanner both read answers this way, so neither sees a different body
//! than the client it protects.

/// One event's lines (none blank), as sent.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Event<'a> {
    /// Its lines, without their line ends.
    pub lines: Vec<&'a str>,
}

impl Event<'_> {
    /// The event's data, if it has a `data` line.
    pub fn data(&self) -> Option<String> {
        let mut data: Option<String> = None;
        for (_, value) in self.lines.iter().map(|l| field(l)).filter(|(f, _)| *f == "data") {
            match &mut data {
                Some(buffer) => {
                    buffer.push('\n');
                    buffer.push_str(value);
                }
                None => data = Some(value.to_string()),
            }
        }
        data
    }
}

/// A body read: the events a client dispatches, and the event the body
/// leaves open at its end (empty if none; a compliant client never
/// dispatches it, a lenient one might).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Body<'a> {
    /// Events ended by a blank line.
    pub events: Vec<Event<'a>>,
    /// What follows the last blank line, including a last line without a
    /// line end.
    pub unended: Event<'a>,
}

/// Reads an SSE body.
pub fn read(body: &str) -> Body<'_> {
    let mut read = Body::default();
    let bytes = body.as_bytes();
    let (mut start, mut i) = (0, 0);
    while i < bytes.len() {
        let end = match bytes[i] {
            b'\n' => 1,
            b'\r' if bytes.get(i + 1) == Some(&b'\n') => 2,
            b'\r' => 1,
            _ => {
                i += 1;
                continue;
            }
        };
        let line = &body[start..i];
        if line.is_empty() {
            read.events.push(std::mem::take(&mut read.unended));
        } else {
            read.unended.lines.push(line);
        }
        i += end;
        start = i;
    }
    if start < body.len() {
        read.unended.lines.push(&body[start..]);
    }
    read
}

/// A line's field name and value (one leading space removed); a comment's
/// field is empty.
pub fn field(line: &str) -> (&str, &str) {
    match line.split_once(':') {
        Some((field, value)) => (field, value.strip_prefix(' ').unwrap_or(value)),
        None => (line, ""),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_line_end_separates_lines_and_events() {
        for eol in ["\n", "\r\n", "\r"] {
            let body = format!("event: m{eol}data: a{eol}data:b{eol}{eol}: note{eol}{eol}data: open");
            let read = read(&body);
            assert_eq!(read.events.len(), 2, "{eol:?}");
            assert_eq!(read.events[0].data().as_deref(), Some("a\nb"));
            assert_eq!(read.events[1].data(), None, "a comment alone has no data");
            assert_eq!(read.unended.data().as_deref(), Some("open"));
        }
        // A blank line right after the previous event's blank line dispatches
        // an empty event (no data): harmless, kept.
        assert_eq!(read("data: x\n\n\n").events.len(), 2);
        assert_eq!(field("data"), ("data", ""));
        assert_eq!(field("data:  two"), ("data", " two"));
    }
}

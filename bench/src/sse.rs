//! Incremental `text/event-stream` parser (WHATWG "interpret an event stream"), fed with arbitrary chunks.
//!
//! Lines end with LF, CRLF or a lone CR, and a chunk may end anywhere, even between CR and LF. A blank line
//! dispatches the event being built when its data buffer is not empty; comments (`:` lines) are counted.

/// One dispatched event. `data` lines are joined with `\n`, as a browser's `EventSource` does.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Event {
    pub id: Option<String>,
    pub event: Option<String>,
    pub data: String,
}

#[derive(Debug, Default)]
pub struct SseParser {
    line: Vec<u8>,
    /// The previous chunk ended with CR: an LF at the start of the next one belongs to it.
    after_cr: bool,
    data: String,
    has_data: bool,
    id: Option<String>,
    event: Option<String>,
    /// Comment lines seen (opening comment, heartbeats).
    pub comments: u64,
}

impl SseParser {
    pub fn new() -> SseParser {
        SseParser::default()
    }

    /// Feeds a chunk; `on_event` is called for each event completed by it.
    pub fn feed(&mut self, mut chunk: &[u8], mut on_event: impl FnMut(Event)) {
        if self.after_cr {
            self.after_cr = false;
            if let Some(rest) = chunk.strip_prefix(b"\n") {
                chunk = rest;
            }
        }
        while !chunk.is_empty() {
            match chunk.iter().position(|&b| b == b'\n' || b == b'\r') {
                None => {
                    self.line.extend_from_slice(chunk);
                    return;
                }
                Some(pos) => {
                    let cr = chunk[pos] == b'\r';
                    let line_end = pos;
                    let mut next = pos + 1;
                    if cr {
                        if next == chunk.len() {
                            self.after_cr = true;
                        } else if chunk[next] == b'\n' {
                            next += 1;
                        }
                    }
                    if self.line.is_empty() {
                        self.process_line(&chunk[..line_end], &mut on_event);
                    } else {
                        self.line.extend_from_slice(&chunk[..line_end]);
                        let line = std::mem::take(&mut self.line);
                        self.process_line(&line, &mut on_event);
                        self.line = line;
                        self.line.clear();
                    }
                    chunk = &chunk[next..];
                }
            }
        }
    }

    fn process_line(&mut self, line: &[u8], on_event: &mut impl FnMut(Event)) {
        if line.is_empty() {
            if self.has_data {
                on_event(Event {
                    id: self.id.clone(),
                    event: self.event.take(),
                    data: std::mem::take(&mut self.data),
                });
            } else {
                self.event = None;
            }
            self.has_data = false;
            return;
        }
        if line[0] == b':' {
            self.comments += 1;
            return;
        }
        let (field, value) = match line.iter().position(|&b| b == b':') {
            Some(p) => {
                let v = &line[p + 1..];
                (&line[..p], v.strip_prefix(b" ").unwrap_or(v))
            }
            None => (line, &b""[..]),
        };
        let value = String::from_utf8_lossy(value);
        match field {
            b"data" => {
                if self.has_data {
                    self.data.push('\n');
                }
                self.data.push_str(&value);
                self.has_data = true;
            }
            // The last event id persists across events, as in a browser.
            b"id" if !value.contains('\0') => self.id = Some(value.into_owned()),
            b"event" => self.event = Some(value.into_owned()),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_split(input: &[u8], splits: &[usize]) -> (Vec<Event>, u64) {
        let mut p = SseParser::new();
        let mut out = Vec::new();
        let mut last = 0;
        for &s in splits.iter().chain(std::iter::once(&input.len())) {
            p.feed(&input[last..s], |e| out.push(e));
            last = s;
        }
        (out, p.comments)
    }

    const STREAM: &[u8] = b":\n\nid: 1\ndata: a\n\n: heartbeat\n\nevent: up\nid: 2\ndata: x\ndata:y\ndata\n\nretry: 10\n\ndata: last\r\n\r\nid: 3\rdata: cr\r\r";

    fn expected() -> Vec<Event> {
        vec![
            Event {
                id: Some("1".into()),
                event: None,
                data: "a".into(),
            },
            Event {
                id: Some("2".into()),
                event: Some("up".into()),
                data: "x\ny\n".into(),
            },
            Event {
                id: Some("2".into()),
                event: None,
                data: "last".into(),
            },
            Event {
                id: Some("3".into()),
                event: None,
                data: "cr".into(),
            },
        ]
    }

    #[test]
    fn whole_stream() {
        let (evs, comments) = parse_split(STREAM, &[]);
        assert_eq!(evs, expected());
        assert_eq!(comments, 2);
    }

    #[test]
    fn every_single_split_point() {
        for s in 0..=STREAM.len() {
            let (evs, comments) = parse_split(STREAM, &[s]);
            assert_eq!(evs, expected(), "split at {s}");
            assert_eq!(comments, 2, "split at {s}");
        }
    }

    #[test]
    fn every_pair_of_split_points_and_byte_by_byte() {
        for a in 0..=STREAM.len() {
            for b in a..=STREAM.len() {
                let (evs, _) = parse_split(STREAM, &[a, b]);
                assert_eq!(evs, expected(), "split at {a},{b}");
            }
        }
        let bytes: Vec<usize> = (1..STREAM.len()).collect();
        assert_eq!(parse_split(STREAM, &bytes).0, expected());
    }

    #[test]
    fn comments_only_and_empty_data_dispatch_nothing() {
        let (evs, comments) = parse_split(b":hello\n\n:\n\nevent: x\n\n", &[]);
        assert!(evs.is_empty());
        assert_eq!(comments, 2);
        // `data:` with an empty value is an event with empty data.
        let (evs, _) = parse_split(b"data:\n\n", &[]);
        assert_eq!(
            evs,
            vec![Event {
                id: None,
                event: None,
                data: String::new()
            }]
        );
    }

    #[test]
    fn incomplete_event_is_held_back() {
        let mut p = SseParser::new();
        let mut n = 0;
        p.feed(b"data: half", |_| n += 1);
        p.feed(b"\n", |_| n += 1);
        assert_eq!(n, 0);
        p.feed(b"\n", |_| n += 1);
        assert_eq!(n, 1);
    }
}

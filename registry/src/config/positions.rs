//! Source positions of YAML nodes, so that every config error can name the file, line and
//! column of what it is about. serde_yaml does not expose node positions, so the file is
//! also read with yaml-rust2's event parser, recording where each node of each document
//! starts, keyed by its field path (`spec.gateways[0].ip`), the same path that
//! `serde_path_to_error` reports.

use std::collections::HashMap;

use yaml_rust2::parser::{MarkedEventReceiver, Parser};
use yaml_rust2::scanner::Marker;
use yaml_rust2::{Event, ScanError};

/// A 1-based line and column in the config file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Position {
    /// 1-based line.
    pub line: usize,
    /// 1-based column.
    pub column: usize,
}

impl From<Marker> for Position {
    fn from(m: Marker) -> Self {
        Self {
            line: m.line(),
            column: m.col() + 1,
        }
    }
}

/// Where each node of one YAML document starts.
#[derive(Debug, Default)]
pub struct DocPositions {
    start: Position,
    nodes: HashMap<String, Position>,
}

impl DocPositions {
    /// The position of the node at `path`, or of its nearest ancestor that exists (a missing
    /// field is reported where its parent mapping starts), or of the document.
    pub fn find(&self, path: &str) -> Position {
        let mut p = path;
        loop {
            if let Some(pos) = self.nodes.get(p) {
                return *pos;
            }
            match p.rfind(['.', '[']) {
                Some(i) => p = &p[..i],
                None => return self.nodes.get("").copied().unwrap_or(self.start),
            }
        }
    }
}

/// Reads the positions of every node in every document of `src`.
pub fn index(src: &str) -> Result<Vec<DocPositions>, (Position, String)> {
    let mut rx = Receiver::default();
    let mut parser = Parser::new_from_str(src);
    parser.load(&mut rx, true).map_err(|e: ScanError| {
        (
            Position {
                line: e.marker().line(),
                column: e.marker().col() + 1,
            },
            e.info().to_owned(),
        )
    })?;
    Ok(rx.docs)
}

/// One open collection while walking the events.
enum Frame {
    /// A mapping; `key` is the pending key, or `None` when the next scalar is a key.
    /// `keys` counts keys seen so far.
    Map {
        path: String,
        key: Option<String>,
        keys: usize,
    },
    /// A sequence and the index of its next item.
    Seq { path: String, next: usize },
}

#[derive(Default)]
struct Receiver {
    docs: Vec<DocPositions>,
    stack: Vec<Frame>,
}

impl Receiver {
    /// The path of the node that starts now, or `None` when it is a mapping key.
    fn next_path(&mut self) -> Option<String> {
        match self.stack.last_mut() {
            None => Some(String::new()),
            Some(Frame::Map { path, key, .. }) => {
                let k = key.take()?;
                Some(if path.is_empty() {
                    k
                } else {
                    format!("{path}.{k}")
                })
            }
            Some(Frame::Seq { path, next }) => {
                let p = format!("{path}[{next}]");
                *next += 1;
                Some(p)
            }
        }
    }

    fn record(&mut self, path: &str, mark: Marker) {
        if let Some(doc) = self.docs.last_mut() {
            doc.nodes.entry(path.to_owned()).or_insert(mark.into());
        }
    }
}

impl MarkedEventReceiver for Receiver {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        match ev {
            Event::DocumentStart => {
                self.docs.push(DocPositions {
                    start: mark.into(),
                    nodes: HashMap::new(),
                });
                self.stack.clear();
            }
            Event::Scalar(value, ..) => match self.next_path() {
                Some(path) => self.record(&path, mark),
                None => {
                    if let Some(Frame::Map { path, key, keys }) = self.stack.last_mut() {
                        *key = Some(value);
                        *keys += 1;
                        // yaml-rust2 marks a block mapping's start after its first key; the
                        // first key's own mark is where a reader sees the mapping begin.
                        if *keys == 1
                            && let Some(doc) = self.docs.last_mut()
                            && let Some(pos) = doc.nodes.get_mut(path.as_str())
                        {
                            let m = Position::from(mark);
                            if (m.line, m.column) < (pos.line, pos.column) {
                                *pos = m;
                            }
                        }
                    }
                }
            },
            Event::Alias(_) => {
                if let Some(path) = self.next_path() {
                    self.record(&path, mark);
                }
            }
            Event::MappingStart(..) => {
                // A complex (non-scalar) key gets no path of its own.
                let path = self.next_path().unwrap_or_default();
                self.record(&path, mark);
                self.stack.push(Frame::Map {
                    path,
                    key: None,
                    keys: 0,
                });
            }
            Event::SequenceStart(..) => {
                let path = self.next_path().unwrap_or_default();
                self.record(&path, mark);
                self.stack.push(Frame::Seq { path, next: 0 });
            }
            Event::MappingEnd | Event::SequenceEnd => {
                self.stack.pop();
            }
            Event::Nothing | Event::StreamStart | Event::StreamEnd | Event::DocumentEnd => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_and_positions() {
        let src = "a: 1\nb:\n  c: [x, y]\n  d:\n    - e: 2\n---\nkind: X\n";
        let docs = index(src).unwrap();
        assert_eq!(docs.len(), 2);
        assert_eq!(docs[0].find("a"), Position { line: 1, column: 4 });
        assert_eq!(
            docs[0].find("b.c[1]"),
            Position {
                line: 3,
                column: 10
            }
        );
        assert_eq!(
            docs[0].find("b.d[0].e"),
            Position {
                line: 5,
                column: 10
            }
        );
        // A missing field points at its parent.
        assert_eq!(docs[0].find("b.d[0].zzz"), Position { line: 5, column: 7 });
        assert_eq!(docs[1].find("kind"), Position { line: 7, column: 7 });
    }

    #[test]
    fn syntax_error_is_located() {
        // The flow sequence opened on line 1 is never closed, so on line 2 the scanner
        // meets `b: 3` inside it and stops at the `:` (line 2, column 2).
        let (pos, msg) = index("a: [1, 2\nb: 3\n").unwrap_err();
        assert_eq!((pos.line, pos.column), (2, 2), "{msg}");
        assert!(msg.contains("':'"), "{msg}");
    }
}

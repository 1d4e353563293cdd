//! Aligned text tables for `shoalctl`'s human output: a header row and
//! columns padded to their widest cell, two spaces apart. Cells are made
//! single-line (control characters become spaces) and long ones are cut.

/// Longest cell before it is cut with `…`.
pub const MAX_CELL: usize = 80;

#[derive(Debug, Clone, Default)]
pub struct Table {
    rows: Vec<Vec<String>>,
}

/// A cell's text: one line, at most [`MAX_CELL`] characters.
pub fn cell(text: &str) -> String {
    let one_line: String = text
        .trim_end()
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if one_line.chars().count() <= MAX_CELL {
        return one_line;
    }
    let mut cut: String = one_line.chars().take(MAX_CELL - 1).collect();
    cut.push('…');
    cut
}

impl Table {
    /// A table without a header row (key/value listings).
    pub fn plain() -> Table {
        Table::default()
    }

    pub fn new(headers: &[&str]) -> Table {
        Table {
            rows: vec![headers.iter().map(|h| h.to_string()).collect()],
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells.iter().map(|c| cell(c)).collect());
    }

    pub fn render(&self) -> String {
        let cols = self.rows.iter().map(Vec::len).max().unwrap_or(0);
        let mut widths = vec![0; cols];
        for row in &self.rows {
            for (i, c) in row.iter().enumerate() {
                widths[i] = widths[i].max(c.chars().count());
            }
        }
        let mut out = String::new();
        for row in &self.rows {
            let mut line = String::new();
            for (i, c) in row.iter().enumerate() {
                if i > 0 {
                    line.push_str("  ");
                }
                line.push_str(c);
                if i + 1 < row.len() {
                    line.extend(std::iter::repeat_n(' ', widths[i] - c.chars().count()));
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_line_up() {
        let mut t = Table::new(&["ID", "STATE", "PEER"]);
        t.row(vec!["1".into(), "ready".into(), "10.0.0.5:4100".into()]);
        t.row(vec!["12".into(), "offline".into(), "".into()]);
        assert_eq!(
            t.render(),
            "ID  STATE    PEER\n1   ready    10.0.0.5:4100\n12  offline\n"
        );
        assert_eq!(cell("a\nb"), "a b");
        assert_eq!(cell(&"x".repeat(200)).chars().count(), MAX_CELL);
    }
}

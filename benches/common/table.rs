//! Printing figures: aligned text tables and sizes.

/// KiB as MiB with one decimal, e.g. "12.3 MiB".
pub fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

/// Prints `rows` under `header` in columns separated by " | ", with a rule under the header;
/// a column whose `right` is true is right-aligned. A note row (every cell after the second
/// empty) does not widen the columns, and prints its first two cells only.
pub fn print_aligned<R: AsRef<[String]>>(header: &[&str], rows: &[R], right: &[bool]) {
    let mut width: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        let r = r.as_ref();
        // A note row (all cells after the second empty) does not widen the columns.
        if r.iter().skip(2).all(|c| c.is_empty()) {
            continue;
        }
        for (i, c) in r.iter().enumerate() {
            width[i] = width[i].max(c.chars().count());
        }
    }
    let line = |cells: &[String]| {
        let mut s = String::new();
        let note = cells.iter().skip(2).all(|c| c.is_empty());
        for (i, c) in cells.iter().enumerate() {
            if note && i >= 2 {
                break;
            }
            if i > 0 {
                s.push_str(" | ");
            }
            let pad = width[i].saturating_sub(c.chars().count());
            if right[i] && !note {
                s.push_str(&" ".repeat(pad));
                s.push_str(c);
            } else {
                s.push_str(c);
                if !(note && i == 1) {
                    s.push_str(&" ".repeat(pad));
                }
            }
        }
        println!("{}", s.trim_end());
    };
    let h: Vec<String> = header.iter().map(|s| s.to_string()).collect();
    line(&h);
    println!(
        "{}",
        width
            .iter()
            .map(|w| "-".repeat(*w))
            .collect::<Vec<_>>()
            .join("-|-")
    );
    for r in rows {
        line(r.as_ref());
    }
}

//! Loading: a file or reader (plain or gzip, detected by its magic bytes) into a [`Dataset`]:
//! every data row either kept under its key or rejected with its line number and reason.

use super::format::parse_header;
use super::key::{event_id, fallback_key};
use super::{CsvFormat, EVENT_ID_COLUMN, RecordKey};
use crate::wire::PackedRow;
use std::collections::VecDeque;
use std::fmt;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

/// One data row, stored under `key`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    /// 1-based line number where the record starts in the (decompressed) file; the header is line 1.
    pub line: u64,
    pub key: RecordKey,
    /// The fields exactly as in the file, one per column of [`Dataset::columns`], packed in
    /// one buffer as they travel and are stored (one allocation per row, not per field).
    pub values: PackedRow,
}

/// A data row that could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowError {
    /// 1-based line number where the record starts.
    pub line: u64,
    pub reason: String,
}

impl fmt::Display for RowError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}: {}", self.line, self.reason)
    }
}

/// A loaded CSV file.
#[derive(Debug, Clone)]
pub struct Dataset {
    pub format: CsvFormat,
    /// Header names, trimmed and lower-cased, in file order.
    pub columns: Vec<String>,
    pub rows: Vec<Row>,
    pub rejected: Vec<RowError>,
    /// How many rows got a fallback key.
    pub fallback_keys: u64,
}

impl Dataset {
    /// Data records read: rows kept plus rows rejected.
    pub fn read(&self) -> u64 {
        (self.rows.len() + self.rejected.len()) as u64
    }

    /// Index of a column by name (case-insensitive, trimmed).
    pub fn column_index(&self, name: &str) -> Option<usize> {
        let name = name.trim().to_lowercase();
        self.columns.iter().position(|c| *c == name)
    }

    /// The value of column `name` in `row` (`None` if there is no such column).
    pub fn value<'a>(&self, row: &'a Row, name: &str) -> Option<&'a str> {
        self.column_index(name).and_then(|i| row.values.field(i))
    }
}

/// Why a file could not be loaded at all (problems with single rows go to [`Dataset::rejected`]).
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("I/O error reading {}{}: {source}", origin(.path), near_line(.line))]
    Io {
        path: Option<PathBuf>,
        /// Line being read when the error happened, where known.
        line: Option<u64>,
        #[source]
        source: io::Error,
    },
    #[error("{} is empty: no header line found", origin(.path))]
    EmptyFile { path: Option<PathBuf> },
    #[error("bad header in {}: {reason}", origin(.path))]
    Header {
        path: Option<PathBuf>,
        reason: String,
    },
    #[error("CSV parser cannot continue in {} at line {line}: {reason}", origin(.path))]
    Csv {
        path: Option<PathBuf>,
        line: u64,
        reason: String,
    },
}

impl LoadError {
    /// The file this error is about, if it came from [`load_path`].
    pub fn path(&self) -> Option<&Path> {
        match self {
            LoadError::Io { path, .. }
            | LoadError::EmptyFile { path }
            | LoadError::Header { path, .. }
            | LoadError::Csv { path, .. } => path.as_deref(),
        }
    }

    fn with_path(mut self, p: &Path) -> Self {
        match &mut self {
            LoadError::Io { path, .. }
            | LoadError::EmptyFile { path }
            | LoadError::Header { path, .. }
            | LoadError::Csv { path, .. } => *path = Some(p.to_path_buf()),
        }
        self
    }
}

fn origin(path: &Option<PathBuf>) -> String {
    match path {
        Some(p) => format!("{:?}", p.display().to_string()),
        None => "input".to_string(),
    }
}

fn near_line(line: &Option<u64>) -> String {
    match line {
        Some(l) => format!(" near line {l}"),
        None => String::new(),
    }
}

fn open(path: &Path) -> Result<std::fs::File, LoadError> {
    std::fs::File::open(path).map_err(|source| LoadError::Io {
        path: Some(path.to_path_buf()),
        line: None,
        source,
    })
}

/// Load a CSV file (plain or gzip-compressed).
pub fn load_path(path: &Path) -> Result<Dataset, LoadError> {
    let file = open(path)?;
    load_reader(file).map_err(|e| e.with_path(path))
}

/// Load CSV from any reader (plain or gzip-compressed, detected by the magic bytes).
pub fn load_reader<R: Read>(reader: R) -> Result<Dataset, LoadError> {
    let mut whole: Option<Dataset> = None;
    stream_reader(reader, usize::MAX, &mut |chunk| {
        match &mut whole {
            None => whole = Some(chunk),
            Some(d) => d.absorb(chunk),
        }
        true
    })?;
    whole.ok_or(LoadError::EmptyFile { path: None })
}

/// Reads a CSV file (plain or gzip) in chunks of at most `rows` rows, each a [`Dataset`] of its
/// own (same format and columns; rejected rows and fallback keys of that stretch), handed to
/// `sink` as soon as it is full: memory stays bounded by the chunk, whatever the file's size.
/// `sink` returns false to stop reading. At least one chunk is handed over (the header's, maybe
/// without rows).
pub fn stream_path(
    path: &Path,
    rows: usize,
    sink: &mut dyn FnMut(Dataset) -> bool,
) -> Result<(), LoadError> {
    let file = open(path)?;
    stream_reader(file, rows, sink).map_err(|e| e.with_path(path))
}

/// As [`stream_path`], from any reader.
pub fn stream_reader<R: Read>(
    reader: R,
    rows: usize,
    sink: &mut dyn FnMut(Dataset) -> bool,
) -> Result<(), LoadError> {
    read_text(decompressed(reader)?, rows, sink)
}

/// The text of `reader`, gunzipped when it is gzip (by its magic bytes, not by a name).
fn decompressed<'r, R: Read + 'r>(reader: R) -> Result<Box<dyn Read + 'r>, LoadError> {
    let (magic, rest) = peek(reader, 2).map_err(|source| io_err(None, source))?;
    let gzip = magic == [0x1f, 0x8b];
    let stream = io::Cursor::new(magic).chain(rest);
    if gzip {
        Ok(Box::new(flate2::read::MultiGzDecoder::new(stream)))
    } else {
        Ok(Box::new(stream))
    }
}

/// The text of `reader` after a UTF-8 byte order mark, if it starts with one.
fn without_bom<R: Read>(reader: R) -> Result<impl Read, LoadError> {
    let (head, rest) = peek(reader, BOM.len()).map_err(|source| io_err(Some(1), source))?;
    let head = if head == BOM { Vec::new() } else { head };
    Ok(io::Cursor::new(head).chain(rest))
}

/// The CSV reader both readers use: records of any length (a short row is a rejected row,
/// not an error), the header read as a record.
fn csv_reader<R: Read>(text: R) -> csv::Reader<R> {
    csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .buffer_capacity(64 * 1024)
        .from_reader(text)
}

/// The event id of a record, if its `EVENT_ID` column holds one.
fn event_id_of(rec: &csv::ByteRecord, id_col: Option<usize>) -> Option<u64> {
    id_col
        .and_then(|i| rec.get(i))
        .and_then(|f| std::str::from_utf8(f).ok())
        .and_then(event_id)
}

impl Dataset {
    /// Appends a later chunk of the same file.
    pub fn absorb(&mut self, chunk: Dataset) {
        self.rows.extend(chunk.rows);
        self.rejected.extend(chunk.rejected);
        self.fallback_keys += chunk.fallback_keys;
    }
}

fn io_err(line: Option<u64>, source: io::Error) -> LoadError {
    LoadError::Io {
        path: None,
        line,
        source,
    }
}

/// Read up to `n` bytes (fewer only at end of input), returning them and the rest of the reader.
fn peek<R: Read>(mut reader: R, n: usize) -> io::Result<(Vec<u8>, R)> {
    let mut buf = vec![0u8; n];
    let mut got = 0;
    while got < n {
        match reader.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(k) => got += k.min(n - got),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    buf.truncate(got);
    Ok((buf, reader))
}

const BOM: &[u8] = b"\xef\xbb\xbf";

/// Parse decompressed CSV text, handing chunks of at most `chunk_rows` rows to `sink`.
fn read_text<R: Read>(
    reader: R,
    chunk_rows: usize,
    sink: &mut dyn FnMut(Dataset) -> bool,
) -> Result<(), LoadError> {
    let mut rdr = csv_reader(LineTracker::new(without_bom(reader)?));
    let mut rec = csv::ByteRecord::new();

    // Header.
    let header_start = rdr.position().byte();
    match rdr.read_byte_record(&mut rec) {
        Ok(true) => {}
        Ok(false) => return Err(LoadError::EmptyFile { path: None }),
        Err(e) => {
            let line = rdr.get_mut().line_at(header_start);
            return Err(csv_fatal(e, line));
        }
    }
    let columns = parse_header(&rec)?;
    let format = CsvFormat::detect(&columns);
    let id_col = columns.iter().position(|c| c == EVENT_ID_COLUMN);
    let empty = |columns: &Vec<String>| Dataset {
        format,
        columns: columns.clone(),
        rows: Vec::new(),
        rejected: Vec::new(),
        fallback_keys: 0,
    };
    let mut ds = empty(&columns);
    let mut handed = false;
    let ncols = ds.columns.len();
    // Byte offset of the last recoverable csv error, to never loop on one spot.
    let mut last_error_at: Option<u64> = None;

    loop {
        if ds.rows.len() >= chunk_rows {
            let full = std::mem::replace(&mut ds, empty(&columns));
            handed = true;
            if !sink(full) {
                return Ok(());
            }
        }
        let start = rdr.position().byte();
        let result = rdr.read_byte_record(&mut rec);
        let line = rdr.get_mut().line_at(start);
        match result {
            Ok(false) => break,
            Ok(true) => match row_values(&rec, ncols, &ds.columns) {
                Ok(values) => {
                    let key = match event_id_of(&rec, id_col) {
                        Some(id) => RecordKey::Event(id),
                        None => {
                            ds.fallback_keys += 1;
                            fallback_key(values.fields())
                        }
                    };
                    ds.rows.push(Row { line, key, values });
                }
                Err(reason) => ds.rejected.push(RowError { line, reason }),
            },
            Err(e) => {
                if ends_the_file(&e, start, rdr.position().byte(), &mut last_error_at) {
                    return Err(csv_fatal(e, line));
                }
                ds.rejected.push(RowError {
                    line,
                    reason: format!("CSV error: {e}"),
                });
            }
        }
    }
    if !handed || !ds.rows.is_empty() || !ds.rejected.is_empty() {
        sink(ds);
    }
    Ok(())
}

/// The key of every row that [`stream_path`] would accept, in file order, without building
/// the rows. A distribute's census needs only the keys, and a string per field was most of a
/// parse. `sink` returns false to stop. Rows the full reader rejects are skipped here too; a
/// fatal error is reported without the line the full reader would name.
pub fn scan_keys_path(
    path: &Path,
    sink: &mut dyn FnMut(RecordKey) -> bool,
) -> Result<(), LoadError> {
    let file = open(path)?;
    scan_keys_reader(file, sink).map_err(|e| e.with_path(path))
}

/// [`scan_keys_path`] over any reader (plain or gzip-compressed).
pub fn scan_keys_reader<R: Read>(
    reader: R,
    sink: &mut dyn FnMut(RecordKey) -> bool,
) -> Result<(), LoadError> {
    scan_text(decompressed(reader)?, sink)
}

fn scan_text<R: Read>(reader: R, sink: &mut dyn FnMut(RecordKey) -> bool) -> Result<(), LoadError> {
    let mut rdr = csv_reader(without_bom(reader)?);
    let mut rec = csv::ByteRecord::new();
    match rdr.read_byte_record(&mut rec) {
        Ok(true) => {}
        Ok(false) => return Err(LoadError::EmptyFile { path: None }),
        Err(e) => return Err(csv_fatal(e, 1)),
    }
    let columns = parse_header(&rec)?;
    let id_col = columns.iter().position(|c| c == EVENT_ID_COLUMN);
    let ncols = columns.len();
    let mut last_error_at: Option<u64> = None;
    loop {
        let start = rdr.position().byte();
        match rdr.read_byte_record(&mut rec) {
            Ok(false) => return Ok(()),
            Ok(true) => {
                // What `row_values` rejects, without copying a field.
                if rec.len() != ncols || rec.iter().any(|f| std::str::from_utf8(f).is_err()) {
                    continue;
                }
                let key = match event_id_of(&rec, id_col) {
                    Some(id) => RecordKey::Event(id),
                    // Every field is UTF-8 (checked above).
                    None => fallback_key(rec.iter().map(|f| std::str::from_utf8(f).unwrap_or(""))),
                };
                if !sink(key) {
                    return Ok(());
                }
            }
            Err(e) => {
                if ends_the_file(&e, start, rdr.position().byte(), &mut last_error_at) {
                    let line = rdr.position().line();
                    return Err(csv_fatal(e, line));
                }
            }
        }
    }
}

/// Whether CSV error `e` of the record that started at byte `start` ends the file: an I/O
/// error, or one that left the reader where it was (`now`) or where the last one did (it
/// would loop). Otherwise the record is skipped, and `last_error_at` remembers `now`.
fn ends_the_file(e: &csv::Error, start: u64, now: u64, last_error_at: &mut Option<u64>) -> bool {
    if matches!(e.kind(), csv::ErrorKind::Io(_)) || now == start || *last_error_at == Some(now) {
        return true;
    }
    *last_error_at = Some(now);
    false
}

fn csv_fatal(e: csv::Error, line: u64) -> LoadError {
    let reason = e.to_string();
    match e.into_kind() {
        csv::ErrorKind::Io(source) => io_err(Some(line), source),
        _ => LoadError::Csv {
            path: None,
            line,
            reason,
        },
    }
}

fn row_values(
    rec: &csv::ByteRecord,
    ncols: usize,
    columns: &[String],
) -> Result<PackedRow, String> {
    if rec.len() != ncols {
        return Err(format!("expected {ncols} fields, found {}", rec.len()));
    }
    for (i, field) in rec.iter().enumerate() {
        if let Err(e) = std::str::from_utf8(field) {
            let name = columns.get(i).map(String::as_str).unwrap_or("?");
            return Err(format!(
                "invalid UTF-8 in field {} ({name}) at byte {} of the field",
                i + 1,
                e.valid_up_to()
            ));
        }
    }
    // A length prefix is 1 byte below 128 bytes of field, 2 below 16 KiB.
    let size = rec.as_slice().len() + 2 * ncols;
    Ok(PackedRow::pack_utf8(rec.iter(), size))
}

/// Reader wrapper that remembers where line breaks are, so that a record's true starting line can
/// be computed from the byte offset csv reports (csv's own line numbers are off after CRLF
/// endings and blank lines). A line break is `\r\n`, `\n` or a lone `\r`.
struct LineTracker<R> {
    inner: R,
    /// Bytes passed through so far.
    offset: u64,
    /// Line breaks seen but not yet passed by a query: (start offset, end offset).
    breaks: VecDeque<(u64, u64)>,
    /// Line breaks already passed by a query.
    passed: u64,
    /// Offset of a `\r` whose following byte is not known yet.
    pending_cr: Option<u64>,
}

impl<R: Read> LineTracker<R> {
    fn new(inner: R) -> Self {
        LineTracker {
            inner,
            offset: 0,
            breaks: VecDeque::new(),
            passed: 0,
            pending_cr: None,
        }
    }

    /// 1-based line of the first byte at or after `start` that is not part of a line break (csv
    /// skips blank lines before a record). Offsets must be queried in non-decreasing order.
    fn line_at(&mut self, start: u64) -> u64 {
        let mut cur = start;
        while let Some(&(b_start, b_end)) = self.breaks.front() {
            // A break before `cur` is passed; a break at `cur` is a blank line csv skipped.
            if b_start <= cur {
                cur = cur.max(b_end);
                self.breaks.pop_front();
                self.passed += 1;
            } else {
                break;
            }
        }
        if let Some(cr) = self.pending_cr {
            // Only reachable for a `\r` at the very end of what has been read.
            if cr <= cur {
                return self.passed + 2;
            }
        }
        self.passed + 1
    }

    fn scan(&mut self, buf: &[u8]) {
        let base = self.offset;
        for (i, &b) in buf.iter().enumerate() {
            let at = base + i as u64;
            if let Some(cr) = self.pending_cr.take() {
                if b == b'\n' {
                    self.breaks.push_back((cr, at + 1));
                    continue;
                }
                self.breaks.push_back((cr, cr + 1));
            }
            match b {
                b'\n' => self.breaks.push_back((at, at + 1)),
                b'\r' => self.pending_cr = Some(at),
                _ => {}
            }
        }
        self.offset += buf.len() as u64;
    }
}

impl<R: Read> Read for LineTracker<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        let n = n.min(buf.len());
        if n == 0 {
            if let Some(cr) = self.pending_cr.take() {
                self.breaks.push_back((cr, cr + 1));
            }
        } else {
            self.scan(&buf[..n]);
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::super::testdata::*;
    use super::*;

    #[test]
    fn gzip_gives_the_same_dataset_as_plain() {
        let text = format!(
            "\u{feff}{DETAILS_HEADER}\r\n{DETAILS_ROW_1}\r\n{DETAILS_ROW_2}\r\nshort,row\r\n"
        );
        let plain = load(text.as_bytes());
        assert_eq!(plain.rows.len(), 2);
        assert_eq!(plain.rejected.len(), 1);
        let gz = load(&gzip(text.as_bytes()));
        assert_same(&plain, &gz);
        // Multi-member gzip (what `cat a.gz b.gz` produces) is read to the end.
        let (a, b) = text.as_bytes().split_at(text.len() / 2);
        let mut multi = gzip(a);
        multi.extend(gzip(b));
        assert_same(&plain, &load(&multi));
        // Detection is by content, not by name: a gzip file named .csv works through load_path.
        let dir = std::env::temp_dir().join(format!("stormdht-record-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("details.csv");
        std::fs::write(&p, gzip(text.as_bytes())).unwrap();
        let from_file = load_path(&p).unwrap();
        std::fs::remove_dir_all(&dir).ok();
        assert_same(&plain, &from_file);
    }

    #[test]
    fn the_key_scan_finds_the_keys_of_exactly_the_rows_the_reader_accepts() {
        // A BOM, CRLF, a short row, a row without an event id (fallback key), a field that is
        // not UTF-8, a bad quote, an id that is not a number, and a blank line.
        let mut text = format!(
            "\u{feff}{DETAILS_HEADER}\r\n{DETAILS_ROW_1}\r\nshort,row\r\n\r\n{DETAILS_ROW_2}\r\n"
        )
        .into_bytes();
        let no_id = DETAILS_ROW_1.replacen(",890001,", ",,", 1);
        let bad_id = DETAILS_ROW_2.replacen(",890002,", ",12x,", 1);
        let bad_utf8 = DETAILS_ROW_2.replacen(",890002,", ",\u{1},", 1);
        for row in [no_id.as_bytes(), bad_id.as_bytes(), b"a,\"b\"c,d"] {
            text.extend_from_slice(row);
            text.extend_from_slice(b"\n");
        }
        text.extend(
            bad_utf8
                .as_bytes()
                .iter()
                .map(|&b| if b == 1 { 0xff } else { b }),
        );
        text.extend_from_slice(b"\n");
        let full = load(&text);
        assert!(full.fallback_keys >= 2, "{}", full.fallback_keys);
        assert!(full.rejected.len() >= 2, "{:?}", full.rejected);
        let want: Vec<RecordKey> = full.rows.iter().map(|r| r.key).collect();
        for bytes in [text.clone(), gzip(&text)] {
            let mut got = Vec::new();
            scan_keys_reader(bytes.as_slice(), &mut |k| {
                got.push(k);
                true
            })
            .unwrap();
            assert_eq!(got, want);
        }
        // The sink stops it.
        let mut first = Vec::new();
        scan_keys_reader(text.as_slice(), &mut |k| {
            first.push(k);
            false
        })
        .unwrap();
        assert_eq!(first, want[..1]);
        // A file without a header row is an error, as for the reader.
        assert!(matches!(
            scan_keys_reader(&b""[..], &mut |_| true),
            Err(LoadError::EmptyFile { .. })
        ));
    }

    #[test]
    fn truncated_gzip_is_an_io_error() {
        let text = format!("{COURSE_HEADER}\n").repeat(1)
            + &"1,A,2020,May,Hail,C,X,0,0,0,0,0K,0,\n".repeat(200);
        let gz = gzip(text.as_bytes());
        let err = load_reader(&gz[..gz.len() - 10]).unwrap_err();
        assert!(matches!(err, LoadError::Io { .. }), "{err}");
    }

    #[test]
    fn bad_rows_are_rejected_with_line_numbers_and_loading_continues() {
        let mut text = Vec::new();
        text.extend_from_slice(b"event_id,state,year\n"); // 1
        text.extend_from_slice(b"1,TEXAS,2020\n"); // 2
        text.extend_from_slice(b"2,OHIO\n"); // 3: too few
        text.extend_from_slice(b"3,IOWA,2020,extra\n"); // 4: too many
        text.extend_from_slice(b"4,\xffBAD,2020\n"); // 5: invalid UTF-8
        text.extend_from_slice(b"5,\"MULTI\nLINE\",2020,x\n"); // 6-7: too many, spans two lines
        text.extend_from_slice(b"6,UTAH,2020\n"); // 8
        let ds = load(&text);
        let lines: Vec<_> = ds.rows.iter().map(|r| (r.line, r.key.as_u64())).collect();
        assert_eq!(lines, [(2, 1), (8, 6)]);
        let rejected: Vec<_> = ds.rejected.iter().map(|e| e.line).collect();
        assert_eq!(rejected, [3, 4, 5, 6]);
        assert_eq!(ds.rejected[0].reason, "expected 3 fields, found 2");
        assert_eq!(ds.rejected[1].reason, "expected 3 fields, found 4");
        assert!(
            ds.rejected[2]
                .reason
                .contains("invalid UTF-8 in field 2 (state)")
        );
        assert_eq!(
            ds.rejected[0].to_string(),
            "line 3: expected 3 fields, found 2"
        );
        assert_eq!(ds.read(), 6);
        // Same with CRLF endings.
        let crlf: Vec<u8> = text
            .iter()
            .flat_map(|&b| {
                if b == b'\n' {
                    vec![b'\r', b'\n']
                } else {
                    vec![b]
                }
            })
            .collect();
        let ds2 = load(&crlf);
        assert_eq!(ds2.rows.iter().map(|r| r.line).collect::<Vec<_>>(), [2, 8]);
        assert_eq!(ds2.rejected, ds.rejected);
    }

    #[test]
    fn line_numbers_with_crlf_blank_lines_and_bom() {
        let text = "\u{feff}\r\n\r\nEvent_ID,v\r\n1,a\r\n\r\n\r\n2,\"b\r\nc\"\r\n3,d\n\n4,e\r5,f";
        let ds = load(text.as_bytes());
        assert_eq!(ds.columns, ["event_id", "v"]);
        let got: Vec<_> = ds.rows.iter().map(|r| (r.line, r.key.as_u64())).collect();
        assert_eq!(got, [(4, 1), (7, 2), (9, 3), (11, 4), (12, 5)]);
        assert_eq!(ds.rows[1].values.field(1), Some("b\r\nc"));
    }

    #[test]
    fn bom_is_tolerated_plain_and_gzip() {
        let text = format!("\u{feff}{COURSE_HEADER}\n1,A,2020,May,Hail,C,X,0,0,0,0,0K,0,\n");
        let ds = load(text.as_bytes());
        assert_eq!(ds.columns[0], "event_id");
        assert_eq!(ds.format, CsvFormat::Course);
        assert_eq!(ds.rows[0].key, RecordKey::Event(1));
        assert_same(&ds, &load(&gzip(text.as_bytes())));
        // A BOM before a quoted header name.
        let ds = load("\u{feff}\"Event_Id\",x\n7,y\n".as_bytes());
        assert_eq!(ds.columns, ["event_id", "x"]);
        assert_eq!(ds.rows[0].key, RecordKey::Event(7));
    }

    #[test]
    fn unusable_event_ids_get_fallback_keys() {
        let text = "event_id,v\n,a\nabc,b\n-5,c\n1.5,d\n+5,e\n18446744073709551616,f\n 42 ,g\n18446744073709551615,h\n,a\n";
        let ds = load(text.as_bytes());
        assert!(ds.rejected.is_empty());
        assert_eq!(ds.fallback_keys, 7);
        let keys: Vec<_> = ds.rows.iter().map(|r| r.key).collect();
        for (i, k) in keys.iter().enumerate().take(6) {
            assert_eq!(*k, fallback_key(ds.rows[i].values.fields()), "row {i}");
        }
        assert_eq!(keys[6], RecordKey::Event(42));
        assert_eq!(keys[7], RecordKey::Event(u64::MAX));
        // Same values → same key; different values → different keys.
        assert_eq!(keys[0], keys[8]);
        let mut distinct = keys[..6].to_vec();
        distinct.sort();
        distinct.dedup();
        assert_eq!(distinct.len(), 6);
    }

    #[test]
    fn empty_input_is_a_load_error() {
        for input in [&b""[..], b"\n\n\r\n", b"\xef\xbb\xbf", b"\xef\xbb\xbf\r\n"] {
            let err = load_reader(input).unwrap_err();
            assert!(
                matches!(err, LoadError::EmptyFile { path: None }),
                "{err:?}"
            );
            assert_eq!(err.to_string(), "input is empty: no header line found");
        }
        let err = load_reader(&gzip(b"")[..]).unwrap_err();
        assert!(matches!(err, LoadError::EmptyFile { .. }), "{err:?}");
        // A header with no data rows is fine.
        let ds = load(b"event_id,x\n");
        assert_eq!((ds.read(), ds.rows.len()), (0, 0));
    }

    #[test]
    fn load_path_errors_name_the_path() {
        let p = Path::new("/nonexistent/stormdht/details-1999.csv");
        let err = load_path(p).unwrap_err();
        assert!(matches!(err, LoadError::Io { .. }));
        assert_eq!(err.path(), Some(p));
        assert!(
            err.to_string()
                .contains("/nonexistent/stormdht/details-1999.csv"),
            "{err}"
        );
        let dir =
            std::env::temp_dir().join(format!("stormdht-record-empty-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let empty = dir.join("empty.csv");
        std::fs::write(&empty, b"").unwrap();
        let err = load_path(&empty).unwrap_err();
        std::fs::remove_dir_all(&dir).ok();
        assert!(matches!(err, LoadError::EmptyFile { .. }));
        assert!(err.to_string().contains("empty.csv"), "{err}");
    }

    /// A file of `../shared/data`; its absence fails the test, naming the path.
    fn real_file(name: &str) -> PathBuf {
        let p = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../shared/data")
            .join(name);
        assert!(
            p.is_file(),
            "{} is missing: the tests read the real NOAA files from ../shared/data beside the project",
            p.display()
        );
        p
    }

    /// Streamed in chunks, a file gives the same rows, rejections and line numbers as loaded
    /// whole, no chunk above its size; a sink that says stop ends the reading.
    #[test]
    fn streaming_in_chunks_gives_what_loading_whole_gives() {
        let p = real_file("details-1996.csv");
        let whole = load_path(&p).unwrap();
        let mut chunks = Vec::new();
        stream_path(&p, 5_000, &mut |c| {
            chunks.push(c);
            true
        })
        .unwrap();
        assert_eq!(chunks.len(), 48_534usize.div_ceil(5_000));
        assert!(
            chunks
                .iter()
                .all(|c| c.rows.len() <= 5_000 && c.columns == whole.columns)
        );
        let mut joined = chunks.remove(0);
        for c in chunks {
            joined.absorb(c);
        }
        assert_eq!(joined.rows, whole.rows);
        assert_eq!(joined.rejected, whole.rejected);
        assert_eq!(joined.fallback_keys, whole.fallback_keys);
        let mut seen = 0;
        stream_path(&p, 1_000, &mut |_| {
            seen += 1;
            seen < 3
        })
        .unwrap();
        assert_eq!(seen, 3, "stopped when the sink said so");
        // A file with a bad row in the second chunk: the rejection keeps its line number.
        let rows: String = (0..30)
            .map(|i| {
                if i == 17 {
                    "bad,row\n".to_string()
                } else {
                    format!("{},OHIO,1996,May,Hail,C,X,0,0,0,0,0K,0K,\n", 100 + i)
                }
            })
            .collect();
        let text = format!("{COURSE_HEADER}\n{rows}");
        let mut rejected = Vec::new();
        stream_reader(text.as_bytes(), 10, &mut |c| {
            rejected.extend(c.rejected);
            true
        })
        .unwrap();
        assert_eq!(rejected.iter().map(|r| r.line).collect::<Vec<_>>(), [19]);
    }

    #[test]
    fn real_details_1996() {
        let p = real_file("details-1996.csv");
        let t = std::time::Instant::now();
        let ds = load_path(&p).unwrap();
        let elapsed = t.elapsed();
        eprintln!(
            "parsed {} ({} rows) in {:.1} ms",
            p.display(),
            ds.rows.len(),
            elapsed.as_secs_f64() * 1e3
        );
        assert_eq!(ds.format, CsvFormat::Course);
        assert_eq!(ds.rows.len(), 48_534);
        assert!(
            ds.rejected.is_empty(),
            "{:?}",
            &ds.rejected[..ds.rejected.len().min(5)]
        );
        assert_eq!(ds.fallback_keys, 0);
        assert_eq!(ds.rows[0].key, RecordKey::Event(5570068));
        assert_eq!(ds.rows[0].line, 2);
        assert_eq!(ds.rows[48_533].line, 48_535);
        // CRLF endings: no '\r' may leak into the last column.
        assert!(
            ds.rows
                .iter()
                .all(|r| !r.values.field(13).unwrap_or("").contains('\r'))
        );
        let mut keys: Vec<_> = ds.rows.iter().map(|r| r.key).collect();
        keys.sort();
        keys.dedup();
        assert_eq!(keys.len(), 48_534);
        // Parse speed is measured by `just bench` (parse_ms), not asserted here.
    }

    #[test]
    fn real_details_1950() {
        let p = real_file("details-1950.csv");
        let ds = load_path(&p).unwrap();
        assert_eq!(ds.format, CsvFormat::Course);
        assert_eq!(ds.rows.len(), 223);
        assert!(ds.rejected.is_empty());
        assert_eq!(ds.rows[0].key, RecordKey::Event(10096222));
        assert_eq!(ds.value(&ds.rows[0], "damage_property"), Some("250K"));
    }

    #[test]
    fn garbage_input_never_panics() {
        let mut rng = Chance::seeded(0x9e37_79b9_7f4a_7c15);
        let palette: &[u8] = b",,,\"\"\n\n\r\xef\xbb\xbf\xff\x00 aZ09";
        for round in 0..3000 {
            let len = rng.below(400) as usize;
            let mut data: Vec<u8> = match round % 5 {
                0 => (0..len).map(|_| rng.next() as u8).collect(),
                1 => (0..len)
                    .map(|_| palette[rng.below(palette.len() as u64) as usize])
                    .collect(),
                2 => {
                    let mut d = b"event_id,a,b\n".to_vec();
                    d.extend((0..len).map(|_| palette[rng.below(palette.len() as u64) as usize]));
                    d
                }
                3 => {
                    let mut d = vec![0x1f, 0x8b];
                    d.extend((0..len).map(|_| rng.next() as u8));
                    d
                }
                _ => {
                    let mut d = b"event_id,a\n".to_vec();
                    d.extend((0..len).map(|_| palette[rng.below(palette.len() as u64) as usize]));
                    let mut z = gzip(&d);
                    let cut = rng.below(z.len() as u64 + 1) as usize;
                    z.truncate(cut.max(2));
                    z
                }
            };
            if round % 7 == 0 {
                data.reverse();
            }
            if let Ok(ds) = load_reader(&data[..]) {
                assert!(!ds.columns.is_empty());
                let mut prev = 1;
                for r in &ds.rows {
                    assert_eq!(r.values.fields().count(), ds.columns.len());
                    assert!(r.line > prev, "round {round}: lines must increase");
                    prev = r.line;
                }
                assert!(ds.rejected.iter().all(|e| e.line >= 2));
                let fb = ds
                    .rows
                    .iter()
                    .filter(|r| matches!(r.key, RecordKey::Fallback(_)))
                    .count();
                assert_eq!(fb as u64, ds.fallback_keys);
            }
        }
    }
}

//! Storm event records: NOAA CSV files (details, locations, course 14-column; plain or gzip) → typed rows.
//!
//! Three layouts of the NOAA Storm Events bulk data are recognised (see [`CsvFormat`]); any other
//! CSV with a header row is loaded as [`CsvFormat::Generic`]. Values are kept exactly as they are
//! in the file, as strings. Every data row ends up either in [`Dataset::rows`] (stored under the
//! row's EVENT_ID, or under a [`fallback_key`] when it has none) or in [`Dataset::rejected`] with
//! its line number and the reason: nothing is dropped silently.
//!
//! Input may be gzip-compressed (detected by the magic bytes `1f 8b`, not by the file name), may
//! start with a UTF-8 byte order mark and may use LF, CRLF or CR line endings.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// The key a record is stored under.
///
/// `Event(n)` is the row's EVENT_ID; `Fallback(h)` is a stable hash of the row's values (see
/// [`fallback_key`]) for rows without a usable EVENT_ID.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub enum RecordKey {
    Event(u64),
    Fallback(u64),
}

impl RecordKey {
    /// The number inside either variant.
    pub fn as_u64(&self) -> u64 {
        match *self {
            RecordKey::Event(n) | RecordKey::Fallback(n) => n,
        }
    }
}

impl fmt::Display for RecordKey {
    /// `Event(123)` → `123`; `Fallback(h)` → `x` followed by 16 lowercase hex digits.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            RecordKey::Event(n) => write!(f, "{n}"),
            RecordKey::Fallback(h) => write!(f, "x{h:016x}"),
        }
    }
}

/// Why a string is not a [`RecordKey`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyParseError {
    #[error("empty record key")]
    Empty,
    #[error(
        "invalid record key {input:?}: expected a decimal event id (e.g. \"5570068\") or \"x\" followed by 16 hex digits (e.g. \"x00ff12ab34cd56ef\")"
    )]
    Malformed { input: String },
    #[error("invalid record key {input:?}: event id does not fit in 64 bits")]
    OutOfRange { input: String },
    #[error(
        "invalid fallback key {input:?}: expected \"x\" followed by exactly 16 hex digits, found {digits} characters"
    )]
    FallbackLength { input: String, digits: usize },
}

impl FromStr for RecordKey {
    type Err = KeyParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim();
        if t.is_empty() {
            return Err(KeyParseError::Empty);
        }
        if let Some(hex) = t.strip_prefix('x') {
            if !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(KeyParseError::Malformed { input: t.into() });
            }
            if hex.len() != 16 {
                return Err(KeyParseError::FallbackLength {
                    input: t.into(),
                    digits: hex.len(),
                });
            }
            return u64::from_str_radix(hex, 16)
                .map(RecordKey::Fallback)
                .map_err(|_| KeyParseError::Malformed { input: t.into() });
        }
        if !t.bytes().all(|b| b.is_ascii_digit()) {
            return Err(KeyParseError::Malformed { input: t.into() });
        }
        t.parse::<u64>()
            .map(RecordKey::Event)
            .map_err(|_| KeyParseError::OutOfRange { input: t.into() })
    }
}

/// Which layout a CSV file has, decided from its header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum CsvFormat {
    /// `StormEvents_details-ftp_v1.0_*.csv` (51 columns, with narratives).
    Details,
    /// `StormEvents_locations-ftp_v1.0_*.csv` (11 columns, several rows per event).
    Locations,
    /// The course's 14-column `details-YYYY.csv`.
    Course,
    /// Any other CSV with a header row.
    Generic,
}

/// The 14 columns of the course's `details-YYYY.csv`, in file order.
pub const COURSE_COLUMNS: [&str; 14] = [
    "event_id",
    "state",
    "year",
    "month_name",
    "event_type",
    "cz_type",
    "cz_name",
    "injuries_direct",
    "injuries_indirect",
    "deaths_direct",
    "deaths_indirect",
    "damage_property",
    "damage_crops",
    "tor_f_scale",
];

/// Name of the column holding the key (matched case-insensitively, trimmed).
pub const EVENT_ID_COLUMN: &str = "event_id";

impl CsvFormat {
    /// Decide the format from normalised (trimmed, lower-case) column names.
    ///
    /// Details: has `begin_yearmonth`, `event_id` and `event_narrative`. Locations: has
    /// `location_index` and `latitude`. Course: exactly the 14 [`COURSE_COLUMNS`] (any order).
    pub fn detect(columns: &[String]) -> CsvFormat {
        let has = |name: &str| columns.iter().any(|c| c == name);
        if has("begin_yearmonth") && has(EVENT_ID_COLUMN) && has("event_narrative") {
            CsvFormat::Details
        } else if has("location_index") && has("latitude") {
            CsvFormat::Locations
        } else if columns.len() == COURSE_COLUMNS.len() && COURSE_COLUMNS.iter().all(|c| has(c)) {
            CsvFormat::Course
        } else {
            CsvFormat::Generic
        }
    }
}

impl fmt::Display for CsvFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CsvFormat::Details => "NOAA details (51 columns)",
            CsvFormat::Locations => "NOAA locations (11 columns)",
            CsvFormat::Course => "course details (14 columns)",
            CsvFormat::Generic => "generic CSV with header",
        })
    }
}

/// One data row, stored under `key`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    /// 1-based line number where the record starts in the (decompressed) file; the header is line 1.
    pub line: u64,
    pub key: RecordKey,
    /// The fields exactly as in the file, one per column of [`Dataset::columns`].
    pub values: Vec<String>,
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
        self.column_index(name)
            .and_then(|i| row.values.get(i))
            .map(String::as_str)
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

/// Load a CSV file (plain or gzip-compressed).
pub fn load_path(path: &Path) -> Result<Dataset, LoadError> {
    let file = std::fs::File::open(path).map_err(|source| LoadError::Io {
        path: Some(path.to_path_buf()),
        line: None,
        source,
    })?;
    load_reader(file).map_err(|e| e.with_path(path))
}

/// Load CSV from any reader (plain or gzip-compressed, detected by the magic bytes).
pub fn load_reader<R: Read>(reader: R) -> Result<Dataset, LoadError> {
    let (magic, rest) = peek(reader, 2).map_err(|source| io_err(None, source))?;
    if magic == [0x1f, 0x8b] {
        let stream = io::Cursor::new(magic).chain(rest);
        load_text(flate2::read::MultiGzDecoder::new(stream))
    } else {
        load_text(io::Cursor::new(magic).chain(rest))
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

/// Parse decompressed CSV text.
fn load_text<R: Read>(reader: R) -> Result<Dataset, LoadError> {
    let (head, rest) = peek(reader, BOM.len()).map_err(|source| io_err(Some(1), source))?;
    let head = if head == BOM { Vec::new() } else { head };
    let tracker = LineTracker::new(io::Cursor::new(head).chain(rest));
    let mut rdr = csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .buffer_capacity(64 * 1024)
        .from_reader(tracker);
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

    let mut ds = Dataset {
        format,
        columns,
        rows: Vec::new(),
        rejected: Vec::new(),
        fallback_keys: 0,
    };
    let ncols = ds.columns.len();
    // Byte offset of the last recoverable csv error, to never loop on one spot.
    let mut last_error_at: Option<u64> = None;

    loop {
        let start = rdr.position().byte();
        let result = rdr.read_byte_record(&mut rec);
        let line = rdr.get_mut().line_at(start);
        match result {
            Ok(false) => break,
            Ok(true) => match row_values(&rec, ncols, &ds.columns) {
                Ok(values) => {
                    let key = match id_col.and_then(|i| values.get(i)).and_then(|v| event_id(v)) {
                        Some(id) => RecordKey::Event(id),
                        None => {
                            ds.fallback_keys += 1;
                            fallback_key(&values)
                        }
                    };
                    ds.rows.push(Row { line, key, values });
                }
                Err(reason) => ds.rejected.push(RowError { line, reason }),
            },
            Err(e) => {
                if matches!(e.kind(), csv::ErrorKind::Io(_)) {
                    return Err(csv_fatal(e, line));
                }
                let now = rdr.position().byte();
                if now == start || last_error_at == Some(now) {
                    return Err(csv_fatal(e, line));
                }
                last_error_at = Some(now);
                ds.rejected.push(RowError {
                    line,
                    reason: format!("CSV error: {e}"),
                });
            }
        }
    }
    Ok(ds)
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

fn parse_header(rec: &csv::ByteRecord) -> Result<Vec<String>, LoadError> {
    let header = |reason: String| LoadError::Header { path: None, reason };
    let mut columns = Vec::with_capacity(rec.len());
    let mut seen: HashMap<String, usize> = HashMap::with_capacity(rec.len());
    for (i, field) in rec.iter().enumerate() {
        let name = std::str::from_utf8(field)
            .map_err(|e| {
                header(format!(
                    "column {} name is not valid UTF-8 (bad byte at offset {})",
                    i + 1,
                    e.valid_up_to()
                ))
            })?
            .trim()
            .to_lowercase();
        if name.is_empty() {
            return Err(header(format!(
                "column {} has an empty name (is the first line really a header?)",
                i + 1
            )));
        }
        if let Some(first) = seen.insert(name.clone(), i + 1) {
            return Err(header(format!(
                "duplicate column name {name:?} (columns {first} and {}; names are compared case-insensitively)",
                i + 1
            )));
        }
        columns.push(name);
    }
    if columns.is_empty() {
        return Err(header("no columns".to_string()));
    }
    Ok(columns)
}

fn row_values(
    rec: &csv::ByteRecord,
    ncols: usize,
    columns: &[String],
) -> Result<Vec<String>, String> {
    if rec.len() != ncols {
        return Err(format!("expected {ncols} fields, found {}", rec.len()));
    }
    let mut values = Vec::with_capacity(ncols);
    for (i, field) in rec.iter().enumerate() {
        match std::str::from_utf8(field) {
            Ok(s) => values.push(s.to_owned()),
            Err(e) => {
                let name = columns.get(i).map(String::as_str).unwrap_or("?");
                return Err(format!(
                    "invalid UTF-8 in field {} ({name}) at byte {} of the field",
                    i + 1,
                    e.valid_up_to()
                ));
            }
        }
    }
    Ok(values)
}

/// A usable EVENT_ID: non-empty decimal digits (surrounding whitespace allowed) fitting u64.
fn event_id(value: &str) -> Option<u64> {
    let t = value.trim();
    if t.is_empty() || !t.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    t.parse().ok()
}

/// Fallback key for a row with no usable EVENT_ID: stable across runs, platforms and processes (do NOT use std's RandomState/DefaultHasher): FNV-1a 64 over the values joined with a 0x1f separator, then a splitmix64 finaliser.
///
/// The separator goes between values only (none before the first or after the last). The
/// finaliser is splitmix64's mixing step without the golden-ratio increment:
/// `z ^= z >> 30; z *= 0xbf58476d1ce4e5b9; z ^= z >> 27; z *= 0x94d049bb133111eb; z ^= z >> 31`.
pub fn fallback_key(values: &[String]) -> RecordKey {
    const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut h = FNV_OFFSET;
    let mut eat = |b: u8| {
        h ^= u64::from(b);
        h = h.wrapping_mul(FNV_PRIME);
    };
    for (i, v) in values.iter().enumerate() {
        if i > 0 {
            eat(0x1f);
        }
        v.bytes().for_each(&mut eat);
    }
    let mut z = h;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    RecordKey::Fallback(z ^ (z >> 31))
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
    use super::*;
    use std::io::Write;

    const DETAILS_HEADER: &str = "BEGIN_YEARMONTH,BEGIN_DAY,BEGIN_TIME,END_YEARMONTH,END_DAY,END_TIME,EPISODE_ID,EVENT_ID,STATE,STATE_FIPS,YEAR,MONTH_NAME,EVENT_TYPE,CZ_TYPE,CZ_FIPS,CZ_NAME,WFO,BEGIN_DATE_TIME,CZ_TIMEZONE,END_DATE_TIME,INJURIES_DIRECT,INJURIES_INDIRECT,DEATHS_DIRECT,DEATHS_INDIRECT,DAMAGE_PROPERTY,DAMAGE_CROPS,SOURCE,MAGNITUDE,MAGNITUDE_TYPE,FLOOD_CAUSE,CATEGORY,TOR_F_SCALE,TOR_LENGTH,TOR_WIDTH,TOR_OTHER_WFO,TOR_OTHER_CZ_STATE,TOR_OTHER_CZ_FIPS,TOR_OTHER_CZ_NAME,BEGIN_RANGE,BEGIN_AZIMUTH,BEGIN_LOCATION,END_RANGE,END_AZIMUTH,END_LOCATION,BEGIN_LAT,BEGIN_LON,END_LAT,END_LON,EPISODE_NARRATIVE,EVENT_NARRATIVE,DATA_SOURCE";
    const DETAILS_ROW_1: &str = "202005,3,1530,202005,3,1545,148000,890001,KANSAS,20,2020,May,Hail,C,15,BUTLER,ICT,03-MAY-20 15:30:00,CST-6,03-MAY-20 15:45:00,0,0,0,0,10K,0.00K,Trained Spotter,1.75,,,,,,,,,,,2,N,EL DORADO,2,N,EL DORADO,37.85,-96.86,37.85,-96.86,\"Storms, some severe, moved \"\"east\"\".\nSecond line.\",\"Golf ball hail, \"\"reported\"\"\",CSV";
    const DETAILS_ROW_2: &str = "202006,12,200,202006,12,215,148100,890002,TEXAS,48,2020,June,Tornado,C,113,DALLAS,FWD,12-JUN-20 02:00:00,CST-6,12-JUN-20 02:15:00,1,0,0,0,1.5M,0.00K,Emergency Manager,,,,,EF1,2.1,150,,,,,1,SW,MESQUITE,2,NE,MESQUITE,32.76,-96.6,32.79,-96.57,Quiet.,,CSV";
    const COURSE_HEADER: &str = "event_id,state,year,month_name,event_type,cz_type,cz_name,injuries_direct,injuries_indirect,deaths_direct,deaths_indirect,damage_property,damage_crops,tor_f_scale";
    const LOCATIONS_HEADER: &str = "YEARMONTH,EPISODE_ID,EVENT_ID,LOCATION_INDEX,RANGE,AZIMUTH,LOCATION,LATITUDE,LONGITUDE,LAT2,LON2";

    fn load(text: &[u8]) -> Dataset {
        match load_reader(text) {
            Ok(ds) => ds,
            Err(e) => panic!("load failed: {e}"),
        }
    }

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        enc.write_all(data).unwrap();
        enc.finish().unwrap()
    }

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    fn assert_same(a: &Dataset, b: &Dataset) {
        assert_eq!(a.format, b.format);
        assert_eq!(a.columns, b.columns);
        assert_eq!(a.rows, b.rows);
        assert_eq!(a.rejected, b.rejected);
        assert_eq!(a.fallback_keys, b.fallback_keys);
    }

    /// Tiny deterministic PRNG (xorshift64).
    struct XorShift(u64);
    impl XorShift {
        fn next(&mut self) -> u64 {
            let mut x = self.0;
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            self.0 = x;
            x
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
        fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
            items[self.below(items.len() as u64) as usize]
        }
    }

    #[test]
    fn details_format_with_quoted_multiline_narrative() {
        assert_eq!(DETAILS_HEADER.split(',').count(), 51);
        let text = format!("{DETAILS_HEADER}\n{DETAILS_ROW_1}\n{DETAILS_ROW_2}\n");
        let ds = load(text.as_bytes());
        assert_eq!(ds.format, CsvFormat::Details);
        assert_eq!(ds.format.to_string(), "NOAA details (51 columns)");
        assert_eq!(ds.columns.len(), 51);
        assert_eq!(ds.columns[7], "event_id");
        assert!(ds.rejected.is_empty(), "{:?}", ds.rejected);
        assert_eq!(ds.rows.len(), 2);
        assert_eq!(ds.read(), 2);
        assert_eq!(ds.fallback_keys, 0);
        let r = &ds.rows[0];
        assert_eq!((r.line, r.key), (2, RecordKey::Event(890001)));
        assert_eq!(r.values.len(), 51);
        assert_eq!(
            ds.value(r, "EPISODE_NARRATIVE"),
            Some("Storms, some severe, moved \"east\".\nSecond line.")
        );
        assert_eq!(
            ds.value(r, "event_narrative"),
            Some("Golf ball hail, \"reported\"")
        );
        assert_eq!(ds.value(r, "magnitude_type"), Some(""));
        // The narrative spans lines 2-3, so the next record starts on line 4.
        assert_eq!(
            (ds.rows[1].line, ds.rows[1].key),
            (4, RecordKey::Event(890002))
        );
        assert_eq!(ds.value(&ds.rows[1], "damage_property"), Some("1.5M"));
    }

    #[test]
    fn locations_rows_sharing_event_id_all_kept() {
        let text = format!(
            "{LOCATIONS_HEADER}\n\
             202005,148000,890001,1,2,N,EL DORADO,37.85,-96.86,3751000,9651600\n\
             202005,148000,890001,2,1,NE,EL DORADO,37.86,-96.85,3751600,9651000\n\
             202005,148000,890001,3,0,,EL DORADO,37.87,-96.84,3752200,9650400\n\
             202006,148100,890002,1,1,SW,MESQUITE,32.76,-96.6,3245600,9636000\n"
        );
        let ds = load(text.as_bytes());
        assert_eq!(ds.format, CsvFormat::Locations);
        assert_eq!(ds.columns.len(), 11);
        assert_eq!(ds.rows.len(), 4);
        let keys: Vec<_> = ds.rows.iter().map(|r| r.key.to_string()).collect();
        assert_eq!(keys, ["890001", "890001", "890001", "890002"]);
        let idx: Vec<_> = ds
            .rows
            .iter()
            .map(|r| ds.value(r, "location_index"))
            .collect();
        assert_eq!(idx, [Some("1"), Some("2"), Some("3"), Some("1")]);
        assert_eq!(ds.rows[2].values[5], "");
        assert_eq!(
            ds.rows.iter().map(|r| r.line).collect::<Vec<_>>(),
            [2, 3, 4, 5]
        );
    }

    #[test]
    fn course_format() {
        let text = format!(
            "{COURSE_HEADER}\n\
             10096222,OKLAHOMA,1950,April,Tornado,C,WASHITA,0,0,0,0,250K,0,F3\n\
             10120412,TEXAS,1950,April,Tornado,C,COMANCHE,0,0,0,0,25K,0,F1\n"
        );
        let ds = load(text.as_bytes());
        assert_eq!(ds.format, CsvFormat::Course);
        assert_eq!(ds.format.to_string(), "course details (14 columns)");
        assert_eq!(ds.columns, COURSE_COLUMNS);
        assert_eq!(ds.rows.len(), 2);
        assert_eq!(ds.rows[0].key, RecordKey::Event(10096222));
        assert_eq!(ds.rows[1].values[11], "25K");
        assert_eq!(ds.rows[1].values[13], "F1");
    }

    #[test]
    fn header_matching_is_case_insensitive_and_trimmed() {
        let text = "State, Event_Id ,YEAR\nTEXAS,42,2020\nOHIO, 43 ,2020\n";
        let ds = load(text.as_bytes());
        assert_eq!(ds.columns, ["state", "event_id", "year"]);
        assert_eq!(ds.format, CsvFormat::Generic);
        assert_eq!(ds.rows[0].key, RecordKey::Event(42));
        assert_eq!(ds.rows[1].key, RecordKey::Event(43));
        // Values are kept exactly as in the file.
        assert_eq!(ds.rows[1].values[1], " 43 ");
        assert_eq!(ds.column_index(" EVENT_ID"), Some(1));
        // The course header in upper case is still the course format.
        let upper = format!("{}\n", COURSE_HEADER.to_uppercase());
        assert_eq!(load(upper.as_bytes()).format, CsvFormat::Course);
        let mixed = DETAILS_HEADER.replace("EVENT_ID", "Event_Id");
        assert_eq!(load(mixed.as_bytes()).format, CsvFormat::Details);
    }

    #[test]
    fn generic_without_event_id_column_uses_fallback_keys() {
        let ds = load(b"a,b\n1,2\n3,4\n1,2\n");
        assert_eq!(ds.format, CsvFormat::Generic);
        assert_eq!(ds.fallback_keys, 3);
        assert_eq!(ds.rows[0].key, fallback_key(&strings(&["1", "2"])));
        assert_eq!(ds.rows[0].key, ds.rows[2].key);
        assert_ne!(ds.rows[0].key, ds.rows[1].key);
    }

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
        assert_eq!(ds.rows[1].values[1], "b\r\nc");
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
            assert_eq!(*k, fallback_key(&ds.rows[i].values), "row {i}");
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
    fn fallback_key_is_pinned() {
        // Values computed independently (FNV-1a 64 over values joined by 0x1f, splitmix64 mix).
        let k = fallback_key(&strings(&["", "TEXAS", "2020", "Hail"]));
        assert_eq!(k, RecordKey::Fallback(0x570b_0189_fc2d_68bf));
        assert_eq!(k.to_string(), "x570b0189fc2d68bf");
        assert_eq!(fallback_key(&[]).to_string(), "xf52a15e9a9b5e89b");
        // The separator matters: ["a"] and ["a", ""] differ, as do ["ab"] and ["a", "b"].
        assert_eq!(
            fallback_key(&strings(&["a"])).to_string(),
            "x02c0bdbf481420f8"
        );
        assert_eq!(
            fallback_key(&strings(&["a", ""])).to_string(),
            "xb9dc434663955e14"
        );
        assert_ne!(
            fallback_key(&strings(&["ab"])),
            fallback_key(&strings(&["a", "b"]))
        );
    }

    #[test]
    fn record_key_display_and_from_str() {
        for k in [
            RecordKey::Event(0),
            RecordKey::Event(123),
            RecordKey::Event(u64::MAX),
            RecordKey::Fallback(0),
            RecordKey::Fallback(0x00ff_12ab_34cd_56ef),
            RecordKey::Fallback(u64::MAX),
        ] {
            assert_eq!(k.to_string().parse::<RecordKey>(), Ok(k));
        }
        assert_eq!(RecordKey::Event(123).to_string(), "123");
        assert_eq!(RecordKey::Fallback(0xff).to_string(), "x00000000000000ff");
        assert_eq!(RecordKey::Fallback(7).as_u64(), 7);
        assert_eq!(RecordKey::Event(9).as_u64(), 9);
        assert_eq!(" 5570068\n".parse(), Ok(RecordKey::Event(5570068)));
        assert_eq!(
            " x00FF12ab34cd56ef ".parse(),
            Ok(RecordKey::Fallback(0x00ff_12ab_34cd_56ef))
        );
        assert_eq!("".parse::<RecordKey>(), Err(KeyParseError::Empty));
        assert_eq!("  ".parse::<RecordKey>(), Err(KeyParseError::Empty));
        for bad in [
            "abc",
            "-5",
            "+5",
            "1.5",
            "x",
            "xg000000000000000",
            "X00ff12ab34cd56ef",
            "12 3",
        ] {
            let e = bad.parse::<RecordKey>().unwrap_err();
            assert!(
                matches!(
                    e,
                    KeyParseError::Malformed { .. } | KeyParseError::FallbackLength { .. }
                ),
                "{bad}: {e:?}"
            );
            assert!(e.to_string().contains("invalid"), "{e}");
        }
        assert!(matches!(
            "x123".parse::<RecordKey>(),
            Err(KeyParseError::FallbackLength { digits: 3, .. })
        ));
        assert!(matches!(
            "18446744073709551616".parse::<RecordKey>(),
            Err(KeyParseError::OutOfRange { .. })
        ));
        assert!(
            "abc"
                .parse::<RecordKey>()
                .unwrap_err()
                .to_string()
                .contains("\"abc\"")
        );
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
    fn header_errors() {
        let err = load_reader(&b"event_id,State,STATE\n1,a,b\n"[..]).unwrap_err();
        assert!(matches!(err, LoadError::Header { .. }));
        assert!(
            err.to_string()
                .contains("duplicate column name \"state\" (columns 2 and 3"),
            "{err}"
        );
        let err = load_reader(&b"event_id,st\xffate\n1,a\n"[..]).unwrap_err();
        assert!(
            err.to_string().contains("column 2 name is not valid UTF-8"),
            "{err}"
        );
        let err = load_reader(&b"event_id,,x\n1,a,b\n"[..]).unwrap_err();
        assert!(
            err.to_string().contains("column 2 has an empty name"),
            "{err}"
        );
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

    fn real_file(name: &str) -> Option<PathBuf> {
        let p = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../shared/data")
            .join(name);
        p.exists().then_some(p)
    }

    #[test]
    fn real_details_1996() {
        let Some(p) = real_file("details-1996.csv") else {
            eprintln!("skipped: details-1996.csv not present");
            return;
        };
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
        assert!(ds.rows.iter().all(|r| !r.values[13].contains('\r')));
        let mut keys: Vec<_> = ds.rows.iter().map(|r| r.key).collect();
        keys.sort();
        keys.dedup();
        assert_eq!(keys.len(), 48_534);
        if !cfg!(debug_assertions) {
            assert!(elapsed.as_millis() < 1000, "too slow: {elapsed:?}");
        }
    }

    #[test]
    fn real_details_1950() {
        let Some(p) = real_file("details-1950.csv") else {
            eprintln!("skipped: details-1950.csv not present");
            return;
        };
        let ds = load_path(&p).unwrap();
        assert_eq!(ds.format, CsvFormat::Course);
        assert_eq!(ds.rows.len(), 223);
        assert!(ds.rejected.is_empty());
        assert_eq!(ds.rows[0].key, RecordKey::Event(10096222));
        assert_eq!(ds.value(&ds.rows[0], "damage_property"), Some("250K"));
    }

    #[test]
    fn garbage_input_never_panics() {
        let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
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
                    assert_eq!(r.values.len(), ds.columns.len());
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

    /// Deterministic 14-column course-format sample (300 rows, 2 of them with an empty event_id).
    fn generate_sample() -> String {
        const STATES: &[&str] = &[
            "TEXAS",
            "KANSAS",
            "OKLAHOMA",
            "NEBRASKA",
            "IOWA",
            "MISSOURI",
            "ILLINOIS",
            "OHIO",
            "GEORGIA",
            "ALABAMA",
            "MISSISSIPPI",
            "FLORIDA",
            "COLORADO",
            "MINNESOTA",
            "NORTH CAROLINA",
            "SOUTH DAKOTA",
            "PENNSYLVANIA",
            "NEW YORK",
            "VIRGINIA",
            "ARKANSAS",
        ];
        const MONTHS: &[&str] = &[
            "January",
            "February",
            "March",
            "April",
            "May",
            "June",
            "July",
            "August",
            "September",
            "October",
            "November",
            "December",
        ];
        const TYPES: &[&str] = &[
            "Tornado",
            "Hail",
            "Hail",
            "Thunderstorm Wind",
            "Thunderstorm Wind",
            "Thunderstorm Wind",
            "Flash Flood",
            "Flood",
            "Heavy Rain",
            "Winter Storm",
            "High Wind",
            "Lightning",
            "Heavy Snow",
            "Drought",
            "Excessive Heat",
        ];
        const COUNTIES: &[&str] = &[
            "JEFFERSON",
            "WASHINGTON",
            "FRANKLIN",
            "JACKSON",
            "LINCOLN",
            "MADISON",
            "CLAY",
            "MONROE",
            "MARION",
            "UNION",
            "GREENE",
            "WARREN",
            "LAKE",
            "POLK",
            "HAMILTON",
            "BENTON",
            "CARROLL",
            "DOUGLAS",
            "SHELBY",
            "WAYNE",
        ];
        const ZONES: &[&str] = &[
            "NORTHERN HIGHLANDS",
            "CENTRAL PLAINS",
            "EASTERN FOOTHILLS",
            "COASTAL LOWLANDS",
            "UPPER VALLEY",
            "WESTERN MOUNTAINS",
        ];
        const DAMAGE: &[&str] = &[
            "0.00K", "0.00K", "0.00K", "1.00K", "2.50K", "5.00K", "10.00K", "25.00K", "50.00K",
            "100.00K", "250.00K", "1.50M", "2.00M", "",
        ];
        let mut rng = XorShift(0x5eed_2020_0000_0001);
        let mut out = format!("{COURSE_HEADER}\n");
        let mut id = 880_000u64;
        for i in 0..300 {
            id += 1 + rng.below(40);
            let event_type = rng.pick(TYPES);
            let zone = matches!(
                event_type,
                "Winter Storm" | "High Wind" | "Heavy Snow" | "Drought" | "Excessive Heat"
            );
            let (cz_type, cz_name) = if zone {
                ("Z", rng.pick(ZONES))
            } else {
                ("C", rng.pick(COUNTIES))
            };
            let harm = |rng: &mut XorShift, p: u64| -> u64 {
                if rng.below(100) < p {
                    1 + rng.below(4)
                } else {
                    0
                }
            };
            let injuries_direct = harm(&mut rng, 6);
            let injuries_indirect = harm(&mut rng, 1);
            let deaths_direct = harm(&mut rng, 1);
            let deaths_indirect = harm(&mut rng, 1);
            let tor_f_scale = if event_type == "Tornado" {
                rng.pick(&["EF0", "EF0", "EF0", "EF1", "EF1", "EF2", "EF3", "EFU"])
            } else {
                ""
            };
            let event_id = if i == 97 || i == 211 {
                String::new()
            } else {
                id.to_string()
            };
            out.push_str(&format!(
                "{event_id},{},2020,{},{event_type},{cz_type},{cz_name},{injuries_direct},{injuries_indirect},{deaths_direct},{deaths_indirect},{},{},{tor_f_scale}\n",
                rng.pick(STATES),
                rng.pick(MONTHS),
                rng.pick(DAMAGE),
                rng.pick(DAMAGE),
            ));
        }
        out
    }

    fn sample_path() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("data/sample-details.csv")
    }

    #[test]
    fn generated_sample_loads() {
        let text = generate_sample();
        let ds = load(text.as_bytes());
        assert_eq!(ds.format, CsvFormat::Course);
        assert_eq!(ds.rows.len(), 300);
        assert!(ds.rejected.is_empty());
        assert_eq!(ds.fallback_keys, 2);
        let mut keys: Vec<_> = ds.rows.iter().map(|r| r.key).collect();
        keys.sort();
        keys.dedup();
        assert_eq!(keys.len(), 300);
        // The checked-in file, where present, is exactly what the generator produces.
        if let Ok(on_disk) = std::fs::read_to_string(sample_path()) {
            assert_eq!(
                on_disk, text,
                "sample-details.csv is stale: rerun write_sample_details"
            );
        }
    }

    /// Writes sample-details.csv: `cargo test write_sample_details -- --ignored`.
    #[test]
    #[ignore]
    fn write_sample_details() {
        std::fs::write(sample_path(), generate_sample()).unwrap();
    }
}

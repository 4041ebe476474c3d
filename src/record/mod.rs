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
//!
//! | module | owns |
//! | --- | --- |
//! | `key` | [`RecordKey`], EVENT_ID parsing, [`fallback_key`] |
//! | `format` | [`CsvFormat`]: the layouts, told apart by header; header parsing |
//! | `load` | [`load_path`], [`load_reader`]: gzip detection, line tracking, [`Dataset`], rejected rows |
//! | `generate` | [`generate`]: a large file from a real one, event ids shifted per pass (scale tests) |

mod format;
mod generate;
mod key;
mod load;
#[cfg(test)]
mod sample;
#[cfg(test)]
mod testdata;

pub use format::{COURSE_COLUMNS, CsvFormat, EVENT_ID_COLUMN};
pub use generate::{GenerateError, ID_STRIDE, generate};
pub use key::{KeyParseError, RecordKey, fallback_key};
pub use load::{
    Dataset, LoadError, Row, RowError, load_path, load_reader, scan_keys_path, scan_keys_reader,
    stream_path, stream_reader,
};

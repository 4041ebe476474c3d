//! A large file made from a real one, for scale tests: the source's rows repeated, each pass
//! with its EVENT_IDs (and EPISODE_IDs) shifted by a fixed stride, so every copy is a distinct
//! record with real values. Rows without an event id are written once (copies would be the
//! same record).

use super::EVENT_ID_COLUMN;
use std::io::{Read, Write};

/// How far apart the passes' event ids are: above any NOAA id (the largest are ~1.3 × 10^7).
pub const ID_STRIDE: u64 = 100_000_000;

#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    #[error("reading the source: {0}")]
    Read(#[from] csv::Error),
    #[error("writing the output: {0}")]
    Write(#[from] std::io::Error),
    #[error("the source has no {EVENT_ID_COLUMN} column: nothing to shift")]
    NoEventId,
    #[error("the source has no rows with an event id")]
    Empty,
}

/// Writes `records` rows built from `source` (plain CSV; gzip is detected) to `out`; returns
/// how many were written.
pub fn generate<R: Read, W: Write>(source: R, out: W, records: u64) -> Result<u64, GenerateError> {
    let mut source = std::io::BufReader::new(source);
    let gz = {
        use std::io::BufRead;
        source.fill_buf()?.starts_with(&[0x1f, 0x8b])
    };
    let reader: Box<dyn Read> = if gz {
        Box::new(flate2::read::MultiGzDecoder::new(source))
    } else {
        Box::new(source)
    };
    let mut csv_in = csv::ReaderBuilder::new().flexible(true).from_reader(reader);
    let header = csv_in.byte_headers()?.clone();
    let column = |name: &str| {
        header
            .iter()
            .position(|h| String::from_utf8_lossy(h).trim().eq_ignore_ascii_case(name))
    };
    let id_at = column(EVENT_ID_COLUMN).ok_or(GenerateError::NoEventId)?;
    let episode_at = column("EPISODE_ID");
    let rows: Vec<csv::ByteRecord> = csv_in.byte_records().collect::<Result<_, _>>()?;
    let parse = |r: &csv::ByteRecord, at: usize| -> Option<u64> {
        std::str::from_utf8(r.get(at)?).ok()?.trim().parse().ok()
    };
    if !rows.iter().any(|r| parse(r, id_at).is_some()) {
        return Err(GenerateError::Empty);
    }
    let mut csv_out = csv::Writer::from_writer(std::io::BufWriter::new(out));
    csv_out.write_byte_record(&header)?;
    let mut written = 0u64;
    'passes: for pass in 0u64.. {
        for row in &rows {
            if written >= records {
                break 'passes;
            }
            let Some(id) = parse(row, id_at) else {
                if pass == 0 {
                    csv_out.write_byte_record(row)?;
                    written += 1;
                }
                continue;
            };
            let shift = pass * ID_STRIDE;
            let new_id = (id + shift).to_string();
            let new_episode =
                episode_at.and_then(|at| parse(row, at).map(|e| (at, (e + shift).to_string())));
            let fields = row.iter().enumerate().map(|(i, f)| {
                if i == id_at {
                    new_id.as_bytes()
                } else if let Some((at, e)) = &new_episode
                    && i == *at
                {
                    e.as_bytes()
                } else {
                    f
                }
            });
            csv_out.write_record(fields)?;
            written += 1;
        }
    }
    csv_out.flush()?;
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{RecordKey, load_reader};

    const SOURCE: &str = "EVENT_ID,EPISODE_ID,STATE\n10,5,OHIO\n,,NOWHERE\n11,,IOWA\n";

    #[test]
    fn copies_shift_event_ids_and_every_record_is_distinct() {
        let mut out = Vec::new();
        let n = generate(SOURCE.as_bytes(), &mut out, 7).unwrap();
        assert_eq!(n, 7);
        let data = load_reader(out.as_slice()).unwrap();
        assert_eq!(data.rows.len(), 7);
        let keys: std::collections::BTreeSet<RecordKey> = data.rows.iter().map(|r| r.key).collect();
        assert_eq!(keys.len(), 7, "every row its own key");
        assert!(keys.contains(&RecordKey::Event(10 + 2 * ID_STRIDE)));
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains(&format!("{},{},OHIO", 10 + ID_STRIDE, 5 + ID_STRIDE)));
        assert_eq!(
            text.matches("NOWHERE").count(),
            1,
            "a row without id is written once"
        );
    }

    #[test]
    fn a_source_without_event_ids_is_refused() {
        let err = generate("STATE\nOHIO\n".as_bytes(), Vec::new(), 3).unwrap_err();
        assert!(matches!(err, GenerateError::NoEventId), "{err}");
        let err = generate("EVENT_ID,STATE\n,OHIO\n".as_bytes(), Vec::new(), 3).unwrap_err();
        assert!(matches!(err, GenerateError::Empty), "{err}");
    }
}

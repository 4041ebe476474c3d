//! The NOAA layouts (details, locations, course), told apart by their header, and header
//! parsing (names matched without regard to case or surrounding space).

use super::LoadError;
use std::collections::HashMap;
use std::fmt;

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

pub(super) fn parse_header(rec: &csv::ByteRecord) -> Result<Vec<String>, LoadError> {
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

#[cfg(test)]
mod tests {
    use super::super::testdata::*;
    use super::super::{RecordKey, fallback_key, load_reader};
    use super::*;

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
        assert_eq!(r.values.fields().count(), 51);
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
        assert_eq!(ds.rows[2].values.field(5), Some(""));
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
        assert_eq!(ds.rows[1].values.field(11), Some("25K"));
        assert_eq!(ds.rows[1].values.field(13), Some("F1"));
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
        assert_eq!(ds.rows[1].values.field(1), Some(" 43 "));
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
        assert_eq!(ds.rows[0].key, fallback_key(strings(&["1", "2"])));
        assert_eq!(ds.rows[0].key, ds.rows[2].key);
        assert_ne!(ds.rows[0].key, ds.rows[1].key);
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
}

//! The sample shipped in `data/sample-details.csv`: generated deterministically, and checked
//! against the file so that the two never drift apart.

use super::testdata::*;
use super::*;
use std::path::{Path, PathBuf};

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
    let mut rng = Chance::seeded(0x5eed_2020_0000_0001);
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
        let harm = |rng: &mut Chance, p: u64| -> u64 {
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

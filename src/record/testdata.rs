//! What the record tests share: sample texts and small helpers.

use super::*;
use std::io::Write;

pub const DETAILS_HEADER: &str = "BEGIN_YEARMONTH,BEGIN_DAY,BEGIN_TIME,END_YEARMONTH,END_DAY,END_TIME,EPISODE_ID,EVENT_ID,STATE,STATE_FIPS,YEAR,MONTH_NAME,EVENT_TYPE,CZ_TYPE,CZ_FIPS,CZ_NAME,WFO,BEGIN_DATE_TIME,CZ_TIMEZONE,END_DATE_TIME,INJURIES_DIRECT,INJURIES_INDIRECT,DEATHS_DIRECT,DEATHS_INDIRECT,DAMAGE_PROPERTY,DAMAGE_CROPS,SOURCE,MAGNITUDE,MAGNITUDE_TYPE,FLOOD_CAUSE,CATEGORY,TOR_F_SCALE,TOR_LENGTH,TOR_WIDTH,TOR_OTHER_WFO,TOR_OTHER_CZ_STATE,TOR_OTHER_CZ_FIPS,TOR_OTHER_CZ_NAME,BEGIN_RANGE,BEGIN_AZIMUTH,BEGIN_LOCATION,END_RANGE,END_AZIMUTH,END_LOCATION,BEGIN_LAT,BEGIN_LON,END_LAT,END_LON,EPISODE_NARRATIVE,EVENT_NARRATIVE,DATA_SOURCE";
pub const DETAILS_ROW_1: &str = "202005,3,1530,202005,3,1545,148000,890001,KANSAS,20,2020,May,Hail,C,15,BUTLER,ICT,03-MAY-20 15:30:00,CST-6,03-MAY-20 15:45:00,0,0,0,0,10K,0.00K,Trained Spotter,1.75,,,,,,,,,,,2,N,EL DORADO,2,N,EL DORADO,37.85,-96.86,37.85,-96.86,\"Storms, some severe, moved \"\"east\"\".\nSecond line.\",\"Golf ball hail, \"\"reported\"\"\",CSV";
pub const DETAILS_ROW_2: &str = "202006,12,200,202006,12,215,148100,890002,TEXAS,48,2020,June,Tornado,C,113,DALLAS,FWD,12-JUN-20 02:00:00,CST-6,12-JUN-20 02:15:00,1,0,0,0,1.5M,0.00K,Emergency Manager,,,,,EF1,2.1,150,,,,,1,SW,MESQUITE,2,NE,MESQUITE,32.76,-96.6,32.79,-96.57,Quiet.,,CSV";
pub const COURSE_HEADER: &str = "event_id,state,year,month_name,event_type,cz_type,cz_name,injuries_direct,injuries_indirect,deaths_direct,deaths_indirect,damage_property,damage_crops,tor_f_scale";
pub const LOCATIONS_HEADER: &str = "YEARMONTH,EPISODE_ID,EVENT_ID,LOCATION_INDEX,RANGE,AZIMUTH,LOCATION,LATITUDE,LONGITUDE,LAT2,LON2";

pub fn load(text: &[u8]) -> Dataset {
    match load_reader(text) {
        Ok(ds) => ds,
        Err(e) => panic!("load failed: {e}"),
    }
}

pub fn gzip(data: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    enc.write_all(data).unwrap();
    enc.finish().unwrap()
}

pub fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

pub fn assert_same(a: &Dataset, b: &Dataset) {
    assert_eq!(a.format, b.format);
    assert_eq!(a.columns, b.columns);
    assert_eq!(a.rows, b.rows);
    assert_eq!(a.rejected, b.rejected);
    assert_eq!(a.fallback_keys, b.fallback_keys);
}

/// The tests' one source of chance: rand's seeded small generator, with the two draws the
/// record tests need.
pub struct Chance(rand::rngs::SmallRng);

impl Chance {
    pub fn seeded(seed: u64) -> Chance {
        Chance(rand::SeedableRng::seed_from_u64(seed))
    }
    pub fn next(&mut self) -> u64 {
        rand::RngCore::next_u64(&mut self.0)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        rand::Rng::random_range(&mut self.0, 0..n.max(1))
    }
    pub fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.below(items.len() as u64) as usize]
    }
}

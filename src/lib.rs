pub mod link;
pub mod record;
pub mod ring;
pub mod wire;

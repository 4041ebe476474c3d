pub mod link;
pub mod manager;
pub mod peer;
pub mod record;
pub mod ring;
pub mod sim;
pub mod store;
pub mod wire;
